// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The few process and socket calls the system layer (ReuseportKit/System) needs that Swift
// cannot import from Glibc (signalfd, prctl, SO_PEERCRED's struct ucred, pidfd_open, capget and
// capset, and the _GNU_SOURCE calls accept4, pipe2 and posix_spawn_file_actions_addclosefrom_np).
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

/* posix_spawn_file_actions_addclosefrom_np (glibc 2.34): the child closes every fd from
 * `lowest` up, so that nothing the daemon inherited without close-on-exec reaches a worker. */
int rpd_spawn_close_from(posix_spawn_file_actions_t *actions, int lowest);

/* pipe2(fds, O_CLOEXEC). */
int rpd_pipe_cloexec(int fds[2]);

/* accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK), filling `address` when given. */
int rpd_accept_nonblocking(int fd, struct sockaddr *address, socklen_t *length);

/* pidfd_open(2) (Linux 5.3; glibc has no wrapper before 2.36). -1 and errno on failure. */
int rpd_pidfd_open(pid_t pid);

/* recvmsg(2) of one datagram, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC, with the sender's
 * SCM_CREDENTIALS (the socket needs SO_PASSCRED; the kernel fills them in for a sender that
 * did not: net/unix/af_unix.c, unix_maybe_add_creds()). Returns the datagram's full length
 * (more than `length` when it was cut), -1 and errno on failure (EAGAIN: none waits).
 * *pid is 0 when no credentials came. Descriptors sent
 * along (SCM_RIGHTS) are closed: nobody may make the daemon hold its fds. */
long rpd_receive_with_credentials(int fd, void *buffer, unsigned long length, pid_t *pid, uid_t *uid);

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

#endif
