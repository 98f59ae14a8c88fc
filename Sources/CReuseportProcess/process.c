// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/membarrier.h>
#include <linux/sched.h>

#include "CReuseportProcess.h"

_Static_assert(sizeof(struct clone_args) == CLONE_ARGS_SIZE_VER2, "struct clone_args with .cgroup (Linux 5.7)");
_Static_assert(sizeof(struct rpd_file_action) == 32, "struct rpd_file_action is mirrored by Swift");

int rpd_signalfd(const sigset_t *mask)
{
	return signalfd(-1, mask, SFD_CLOEXEC | SFD_NONBLOCK);
}

int rpd_signalfd_read(int fd)
{
	struct signalfd_siginfo info;
	ssize_t n;

	do {
		n = read(fd, &info, sizeof(info));
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EAGAIN ? 0 : -1;
	if (n != sizeof(info)) {
		errno = EIO;
		return -1;
	}
	return (int)info.ssi_signo;
}

int rpd_set_parent_death_signal(int sig)
{
	return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0);
}

int rpd_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
		return -1;
	*pid = cred.pid;
	*uid = cred.uid;
	*gid = cred.gid;
	return 0;
}

/* What a failed child tells its parent through the report pipe. */
struct rpd_spawn_failure {
	int32_t error;
	int32_t step;
};

static void __attribute__((noreturn)) rpd_spawn_fail(int report, int step)
{
	struct rpd_spawn_failure failure = { .error = errno, .step = step };
	ssize_t n;

	do {
		n = write(report, &failure, sizeof(failure));
	} while (n < 0 && errno == EINTR);
	_exit(127);
}

/* closefrom(lowest) that spares `keep`. close_range(2) is 5.9; before it, one close() per
 * number up to RLIMIT_NOFILE. */
static void rpd_close_from_except(int lowest, int keep)
{
	struct rlimit limit;
	int last;

	if (keep < lowest) {
		if (syscall(SYS_close_range, (unsigned int)lowest, ~0U, 0) == 0)
			return;
	} else if ((keep == lowest || syscall(SYS_close_range, (unsigned int)lowest, (unsigned int)keep - 1, 0) == 0) &&
		   syscall(SYS_close_range, (unsigned int)keep + 1, ~0U, 0) == 0) {
		return;
	}
	last = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < (1 << 20) ? (int)limit.rlim_cur : 1 << 16;
	for (int fd = lowest; fd < last; fd++)
		if (fd != keep)
			close(fd);
}

/* The child of rpd_spawn_into_cgroup(): a copy of a multi-threaded process, so only
 * async-signal-safe calls (signal-safety(7)) until execve(). The steps and their order are
 * glibc's posix_spawn child's (sysdeps/unix/sysv/linux/spawni.c, __spawni_child()). */
static void __attribute__((noreturn))
rpd_spawn_child(int report, const char *path, char *const argv[], char *const envp[],
		const struct rpd_file_action *actions, size_t count, int flags, const sigset_t *parent_mask)
{
	struct sigaction action = { .sa_handler = SIG_DFL };
	sigset_t empty;
	int top = 2;

	/* Handlers are the parent's code: none may run here. Without RESET_SIGNALS an ignored
	 * signal stays ignored, as across execve(). sigaction() refuses glibc's own signals
	 * (SIGCANCEL, SIGSETXID) and SIGKILL, SIGSTOP: nothing to do there. */
	for (int sig = 1; sig < _NSIG; sig++) {
		struct sigaction old;

		if (sigaction(sig, NULL, &old) != 0)
			continue;
		if (old.sa_handler == SIG_DFL || (old.sa_handler == SIG_IGN && !(flags & RPD_SPAWN_RESET_SIGNALS)))
			continue;
		sigaction(sig, &action, NULL);
	}
	if ((flags & RPD_SPAWN_NEW_SESSION) && setsid() < 0)
		rpd_spawn_fail(report, RPD_SPAWN_STEP_SETSID);
	else if (!(flags & RPD_SPAWN_NEW_SESSION) && (flags & RPD_SPAWN_NEW_PROCESS_GROUP) && setpgid(0, 0) != 0)
		rpd_spawn_fail(report, RPD_SPAWN_STEP_SETPGID);

	/* The report pipe must outlive every action: above every target, and spared by
	 * closefrom. F_DUPFD takes the lowest free number, so it overwrites nothing. */
	for (size_t i = 0; i < count; i++)
		if (actions[i].kind != RPD_FILE_CLOSE_FROM && actions[i].fd > top)
			top = actions[i].fd;
	if (report <= top) {
		int moved = fcntl(report, F_DUPFD_CLOEXEC, top + 1);

		if (moved < 0)
			rpd_spawn_fail(report, RPD_SPAWN_STEP_REPORT);
		report = moved;
	}

	for (size_t i = 0; i < count; i++) {
		const struct rpd_file_action *a = &actions[i];
		int fd;

		switch (a->kind) {
		case RPD_FILE_OPEN:
			fd = open(a->path, a->flags, (mode_t)a->mode);
			if (fd < 0)
				rpd_spawn_fail(report, (int)i);
			if (fd != a->fd) {
				if (dup2(fd, a->fd) < 0)
					rpd_spawn_fail(report, (int)i);
				close(fd);
			}
			break;
		case RPD_FILE_DUPLICATE:
			/* dup2() of a descriptor onto itself leaves close-on-exec set. */
			if (a->source == a->fd) {
				int fdflags = fcntl(a->fd, F_GETFD);

				if (fdflags < 0 || fcntl(a->fd, F_SETFD, fdflags & ~FD_CLOEXEC) != 0)
					rpd_spawn_fail(report, (int)i);
			} else if (dup2(a->source, a->fd) < 0) {
				rpd_spawn_fail(report, (int)i);
			}
			break;
		case RPD_FILE_CLOSE:
			if (close(a->fd) != 0 && errno != EBADF)
				rpd_spawn_fail(report, (int)i);
			break;
		case RPD_FILE_CLOSE_FROM:
			rpd_close_from_except(a->fd, report);
			break;
		default:
			errno = EINVAL;
			rpd_spawn_fail(report, (int)i);
		}
	}

	sigemptyset(&empty);
	if (sigprocmask(SIG_SETMASK, (flags & RPD_SPAWN_RESET_SIGNALS) ? &empty : parent_mask, NULL) != 0)
		rpd_spawn_fail(report, RPD_SPAWN_STEP_SIGNALS);
	execve(path, argv, envp);
	rpd_spawn_fail(report, RPD_SPAWN_STEP_EXEC);
}

pid_t rpd_spawn_into_cgroup(int cgroup_fd, const char *path, char *const argv[], char *const envp[],
			    const struct rpd_file_action *actions, size_t count, int flags, int *failed_step)
{
	struct clone_args args = {
		.flags = CLONE_INTO_CGROUP,
		.exit_signal = SIGCHLD,
		.cgroup = (uint64_t)cgroup_fd,
	};
	struct rpd_spawn_failure failure;
	sigset_t all, old;
	int report[2];
	pid_t pid;
	ssize_t n;
	int saved;

	*failed_step = RPD_SPAWN_STEP_CLONE;
	if (pipe2(report, O_CLOEXEC) != 0)
		return -1;
	/* Blocked across clone3(), so that no handler of this process runs in the child before
	 * it has reset them (posix_spawn does the same). */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	/* glibc 2.36 has no clone3() wrapper; its internal one (2.34) is for threads (CLONE_VM).
	 * No CLONE_VM here: fork semantics, the child runs on a copy of this stack. */
	pid = (pid_t)syscall(SYS_clone3, &args, sizeof(args));
	if (pid == 0)
		rpd_spawn_child(report[1], path, argv, envp, actions, count, flags, &old);
	saved = errno;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	close(report[1]);
	if (pid < 0) {
		close(report[0]);
		errno = saved;
		return -1;
	}
	do {
		n = read(report[0], &failure, sizeof(failure));
	} while (n < 0 && errno == EINTR);
	close(report[0]);
	/* EOF: execve() succeeded and closed the write end. */
	if (n != sizeof(failure))
		return pid;
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
	*failed_step = failure.step;
	errno = failure.error;
	return -1;
}

int rpd_pipe_cloexec(int fds[2])
{
	return pipe2(fds, O_CLOEXEC);
}

int rpd_accept_nonblocking(int fd, struct sockaddr *address, socklen_t *length)
{
	return accept4(fd, address, length, SOCK_CLOEXEC | SOCK_NONBLOCK);
}

const short rpd_posix_spawn_setsid = POSIX_SPAWN_SETSID;

int rpd_spawn_close_from(posix_spawn_file_actions_t *actions, int lowest)
{
	return posix_spawn_file_actions_addclosefrom_np(actions, lowest);
}

int rpd_pidfd_open(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

int rpd_pidfd_getfd(int pidfd, int fd)
{
	return (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
}

int rpd_membarrier_global(void)
{
	return (int)syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0);
}

int rpd_pidfd_send_signal(int pidfd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

int rpd_set_child_subreaper(int on)
{
	return prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0);
}

/* One datagram with what came along: the sender's credentials into *pid and *uid (0 and -1
 * when none came), up to `capacity` passed descriptors into `fds` (*count of them), any more
 * closed. */
static long receive_datagram(int fd, void *buffer, unsigned long length, int flags, pid_t *pid, uid_t *uid,
			     int *fds, size_t capacity, size_t *count)
{
	union {
		struct cmsghdr align;
		char bytes[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * 253)];
	} control;
	struct iovec iov = { .iov_base = buffer, .iov_len = length };
	struct msghdr message = {
		.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof(control),
	};
	struct cmsghdr *header;
	ssize_t n;

	*pid = 0;
	*uid = (uid_t)-1;
	*count = 0;
	n = recvmsg(fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC | flags);
	if (n < 0)
		return -1;
	for (header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
		if (header->cmsg_level != SOL_SOCKET)
			continue;
		if (header->cmsg_type == SCM_CREDENTIALS && header->cmsg_len >= CMSG_LEN(sizeof(struct ucred))) {
			struct ucred credentials;

			memcpy(&credentials, CMSG_DATA(header), sizeof(credentials));
			*pid = credentials.pid;
			*uid = credentials.uid;
		} else if (header->cmsg_type == SCM_RIGHTS) {
			size_t passed_count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);

			for (size_t i = 0; i < passed_count; i++) {
				int passed;

				memcpy(&passed, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
				if (*count < capacity)
					fds[(*count)++] = passed;
				else
					close(passed);
			}
		}
	}
	return n;
}

long rpd_receive_with_credentials(int fd, void *buffer, unsigned long length, pid_t *pid, uid_t *uid)
{
	size_t kept;

	return receive_datagram(fd, buffer, length, MSG_TRUNC, pid, uid, NULL, 0, &kept);
}

long rpd_receive_with_descriptors(int fd, void *buffer, unsigned long length, int *fds, size_t capacity,
				  size_t *count)
{
	pid_t pid;
	uid_t uid;

	return receive_datagram(fd, buffer, length, 0, &pid, &uid, fds, capacity, count);
}

long rpd_send_with_descriptors(int fd, const void *buffer, unsigned long length, const int *fds, size_t count)
{
	union {
		struct cmsghdr align;
		char bytes[CMSG_SPACE(sizeof(int) * 253)];
	} control;
	struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
	struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *header;

	if (count > 253) {
		errno = EINVAL;
		return -1;
	}
	if (count > 0) {
		memset(&control, 0, sizeof(control));
		message.msg_control = &control;
		message.msg_controllen = CMSG_SPACE(sizeof(int) * count);
		header = CMSG_FIRSTHDR(&message);
		header->cmsg_level = SOL_SOCKET;
		header->cmsg_type = SCM_RIGHTS;
		header->cmsg_len = CMSG_LEN(sizeof(int) * count);
		memcpy(CMSG_DATA(header), fds, sizeof(int) * count);
	}
	return sendmsg(fd, &message, MSG_NOSIGNAL);
}

int rpd_capget(uint64_t *effective, uint64_t *permitted, uint64_t *inheritable)
{
	struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = { 0 };

	if (syscall(SYS_capget, &header, data) != 0)
		return -1;
	*effective = (uint64_t)data[1].effective << 32 | data[0].effective;
	*permitted = (uint64_t)data[1].permitted << 32 | data[0].permitted;
	*inheritable = (uint64_t)data[1].inheritable << 32 | data[0].inheritable;
	return 0;
}

int rpd_capset(uint64_t effective, uint64_t permitted, uint64_t inheritable)
{
	struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {
		{ (uint32_t)effective, (uint32_t)permitted, (uint32_t)inheritable },
		{ (uint32_t)(effective >> 32), (uint32_t)(permitted >> 32), (uint32_t)(inheritable >> 32) },
	};

	return (int)syscall(SYS_capset, &header, data);
}

int rpd_capbset_read(int capability)
{
	return prctl(PR_CAPBSET_READ, (unsigned long)capability, 0, 0, 0);
}

int rpd_capbset_drop(int capability)
{
	return prctl(PR_CAPBSET_DROP, (unsigned long)capability, 0, 0, 0);
}

int rpd_ambient_clear_all(void)
{
	return prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
}

int rpd_set_no_new_privs(void)
{
	return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}
