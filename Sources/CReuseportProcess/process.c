// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "CReuseportProcess.h"

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

int rpd_pipe_cloexec(int fds[2])
{
	return pipe2(fds, O_CLOEXEC);
}

int rpd_accept_nonblocking(int fd, struct sockaddr *address, socklen_t *length)
{
	return accept4(fd, address, length, SOCK_CLOEXEC | SOCK_NONBLOCK);
}

int rpd_spawn_close_from(posix_spawn_file_actions_t *actions, int lowest)
{
	return posix_spawn_file_actions_addclosefrom_np(actions, lowest);
}

int rpd_pidfd_open(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

int rpd_set_child_subreaper(int on)
{
	return prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0);
}

long rpd_receive_with_credentials(int fd, void *buffer, unsigned long length, pid_t *pid, uid_t *uid)
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
	n = recvmsg(fd, &message, MSG_DONTWAIT | MSG_TRUNC | MSG_CMSG_CLOEXEC);
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
			size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);

			for (size_t i = 0; i < count; i++) {
				int passed;

				memcpy(&passed, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
				close(passed);
			}
		}
	}
	return n;
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
