// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The few process and socket calls the system layer (ReuseportKit/System) needs that Swift
// cannot import from Glibc (signalfd, prctl, SO_PEERCRED's struct ucred, pidfd_open, capget and
// capset, clone3, and the _GNU_SOURCE calls accept4, pipe2 and posix_spawn_file_actions_addclosefrom_np).
// Every symbol is prefixed rpd_.
#ifndef CREUSEPORT_PROCESS_H
#define CREUSEPORT_PROCESS_H

#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>

#include <linux/capability.h>

/* signalfd(2) for `mask`, close-on-exec and non-blocking. -1 and errno on failure. */
int rpd_signalfd(const sigset_t *mask);

/* Reads one struct signalfd_siginfo; returns the signal number, 0 when none is
 * pending (EAGAIN), -1 and errno on failure. */
int rpd_signalfd_read(int fd);

/* prctl(PR_SET_PDEATHSIG, sig): the kernel sends `sig` to this process when its parent
 * exits. Cleared by credential changes (kernel/cred.c, commit_creds()), so it must be
 * set after dropping privileges. */
int rpd_set_parent_death_signal(int sig);

/* prctl(PR_SET_CHILD_SUBREAPER, on): orphans among this process's descendants are
 * re-parented to it instead of to init, so that the daemon reaps (and can stop) what a
 * worker forked and left behind (kernel/exit.c, find_new_reaper()). Since 3.4. */
int rpd_set_child_subreaper(int on);

/* The peer's credentials of a connected Unix socket (SO_PEERCRED). */
int rpd_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/* POSIX_SPAWN_SETSID (glibc 2.26), which Swift cannot import (_GNU_SOURCE): the child calls
 * setsid() and leads a new session and process group. */
extern const short rpd_posix_spawn_setsid;

/* posix_spawn_file_actions_addclosefrom_np (glibc 2.34): the child closes every fd from
 * `lowest` up, so that nothing the daemon inherited without close-on-exec reaches a worker. */
int rpd_spawn_close_from(posix_spawn_file_actions_t *actions, int lowest);

/* What a child started by rpd_spawn_into_cgroup() does with its descriptors before execve(),
 * in order: the same steps as posix_spawn's file actions. */
enum rpd_file_action_kind {
	RPD_FILE_OPEN = 0,	 /* open(path, flags, mode) as `fd` */
	RPD_FILE_DUPLICATE = 1, /* dup2(source, fd), without close-on-exec */
	RPD_FILE_CLOSE = 2,	 /* close(fd) */
	RPD_FILE_CLOSE_FROM = 3, /* close every descriptor from `fd` up */
};

struct rpd_file_action {
	int32_t kind; /* enum rpd_file_action_kind */
	int32_t fd;
	int32_t source;
	int32_t flags;
	uint32_t mode;
	uint32_t pad;
	const char *path;
};

enum rpd_spawn_flags {
	RPD_SPAWN_NEW_PROCESS_GROUP = 1 << 0, /* setpgid(0, 0) */
	RPD_SPAWN_RESET_SIGNALS = 1 << 1,     /* no signal blocked, every disposition SIG_DFL */
	RPD_SPAWN_NEW_SESSION = 1 << 2,       /* setsid(): a session and process group of its own (instead of setpgid) */
};

/* The step of a start that failed, in *failed_step. */
enum {
	RPD_SPAWN_STEP_CLONE = -1,  /* clone3() itself (or the pipe before it): in the parent */
	RPD_SPAWN_STEP_EXEC = -2,   /* execve() */
	RPD_SPAWN_STEP_SETPGID = -3,
	RPD_SPAWN_STEP_SIGNALS = -4,
	RPD_SPAWN_STEP_REPORT = -5, /* moving the report pipe above the actions' targets */
	RPD_SPAWN_STEP_SETSID = -6,
	/* 0, 1, ...: actions[i] */
};

/* Starts `path` as posix_spawn() would, but created inside the cgroup v2 folder `cgroup_fd`
 * (an O_PATH or O_RDONLY descriptor of it) with clone3(CLONE_INTO_CGROUP) (Linux 5.7): the
 * child is never in the parent's cgroup, and the kernel takes the cgroup threadgroup rwsem
 * only for reading (kernel/cgroup/cgroup.c, cgroup_css_set_fork()), where a write to
 * cgroup.procs takes it for writing and waits for an RCU grace period.
 *
 * Fork semantics (no CLONE_VM): between clone3() and execve() the child makes only
 * async-signal-safe calls. A failure there reaches the parent through a close-on-exec pipe
 * (EOF: execve() succeeded); the child is then reaped here.
 *
 * Returns the child's pid, or -1 with errno and *failed_step (RPD_SPAWN_STEP_*, or the index
 * of the action that failed). Kernels without clone3() answer ENOSYS (before 5.3), without
 * CLONE_INTO_CGROUP EINVAL (5.5, 5.6) or E2BIG (5.3, 5.4: struct clone_args too long). */
pid_t rpd_spawn_into_cgroup(int cgroup_fd, const char *path, char *const argv[], char *const envp[],
			    const struct rpd_file_action *actions, size_t count, int flags, int *failed_step);

/* pipe2(fds, O_CLOEXEC). */
int rpd_pipe_cloexec(int fds[2]);

/* accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK), filling `address` when given. */
int rpd_accept_nonblocking(int fd, struct sockaddr *address, socklen_t *length);

/* pidfd_open(2) (Linux 5.3; glibc has no wrapper before 2.36). -1 and errno on failure. */
int rpd_pidfd_open(pid_t pid);

/* pidfd_getfd(2) (Linux 5.6): a close-on-exec copy of descriptor `fd` of the process `pidfd`
 * names. Needs PTRACE_MODE_ATTACH_REALCREDS over it (CAP_SYS_PTRACE for another user's, or a
 * non-dumpable, process). -1 and errno on failure. */
int rpd_pidfd_getfd(int pidfd, int fd);

/* membarrier(MEMBARRIER_CMD_GLOBAL) (4.3): returns once every CPU went through a quiescent
 * state, that is after synchronize_rcu() (kernel/sched/membarrier.c): every packet whose
 * socket lookup had begun by the call has been delivered. Returns at once on one CPU (nothing
 * runs beside the caller). -1 and errno on failure (EINVAL on nohz_full kernels). */
int rpd_membarrier_global(void);

/* pidfd_send_signal(2) (Linux 5.1): a signal to exactly the process `pidfd` names, never to
 * one that reused its pid. -1 and errno on failure (ESRCH once it has exited). */
int rpd_pidfd_send_signal(int pidfd, int sig);

/* recvmsg(2) of one datagram, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC, with the sender's
 * SCM_CREDENTIALS (the socket needs SO_PASSCRED; the kernel fills them in for a sender that
 * did not: net/unix/af_unix.c, unix_maybe_add_creds()). Returns the datagram's full length
 * (more than `length` when it was cut), -1 and errno on failure (EAGAIN: none waits).
 * *pid is 0 when no credentials came. Descriptors sent
 * along (SCM_RIGHTS) are closed: nobody may make the daemon hold its fds. */
long rpd_receive_with_credentials(int fd, void *buffer, unsigned long length, pid_t *pid, uid_t *uid);

/* sendmsg(2) of one datagram with `count` descriptors passed along (SCM_RIGHTS; at most 253,
 * SCM_MAX_FD), MSG_NOSIGNAL: how sd_pid_notify_with_fds(3) hands fds to systemd's fd store.
 * The receiver gets its own copies; the sender's stay open. Returns the bytes sent, -1 and
 * errno on failure. */
long rpd_send_with_descriptors(int fd, const void *buffer, unsigned long length, const int *fds, size_t count);

/* recvmsg(2) of one datagram, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, keeping the descriptors passed
 * along (SCM_RIGHTS): up to `capacity` of them are stored in `fds` (close-on-exec, the caller
 * owns them), any more are closed; *count says how many were stored. For the receiving end of
 * the fd store in tests. Returns the datagram's length, -1 and errno on failure (EAGAIN: none). */
long rpd_receive_with_descriptors(int fd, void *buffer, unsigned long length, int *fds, size_t capacity,
				  size_t *count);

/* The capability sets of this process, one bit per CAP_* number (capget(2) with
 * _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set). -1 and errno on failure. */
int rpd_capget(uint64_t *effective, uint64_t *permitted, uint64_t *inheritable);

/* capset(2) of this process's three sets. Raising a bit not in the permitted set fails
 * with EPERM; lowering a permitted or inheritable bit also lowers it in the ambient set
 * (security/commoncap.c, cap_capset()). */
int rpd_capset(uint64_t effective, uint64_t permitted, uint64_t inheritable);

/* prctl(PR_CAPBSET_READ / PR_CAPBSET_DROP): the bounding set limits what an execve() can
 * grant, also to root (cap_bprm_creds_from_file()). Dropping needs CAP_SETPCAP. */
int rpd_capbset_read(int capability);
int rpd_capbset_drop(int capability);

/* prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) (4.3): the ambient set survives execve()
 * of a program without file capabilities, and a change between non-zero uids. */
int rpd_ambient_clear_all(void);

/* prctl(PR_SET_NO_NEW_PRIVS, 1): execve() grants nothing from then on (no set-user-ID, no file
 * capabilities), for this process and every child. */
int rpd_set_no_new_privs(void);

#endif
