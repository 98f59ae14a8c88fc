// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#define _GNU_SOURCE
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <errno.h>
#include <string.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include "CReuseportBench.h"

_Static_assert(sizeof(struct rp_bench_mmsghdr) == sizeof(struct mmsghdr), "mmsghdr layout");

int rp_bench_sendmmsg(int fd, struct rp_bench_mmsghdr *messages, unsigned int count, int flags)
{
	return sendmmsg(fd, (struct mmsghdr *)messages, count, flags);
}

int rp_bench_recvmmsg(int fd, struct rp_bench_mmsghdr *messages, unsigned int count, int flags)
{
	return recvmmsg(fd, (struct mmsghdr *)messages, count, flags, NULL);
}

int rp_bench_pin_thread(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

int rp_bench_allowed_cpus(unsigned char *mask, size_t len)
{
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set))
		return -1;
	for (size_t cpu = 0; cpu < len * 8 && cpu < CPU_SETSIZE; cpu++)
		if (CPU_ISSET(cpu, &set))
			mask[cpu / 8] |= 1 << (cpu % 8);
	return 0;
}

int rp_bench_thread_cpu_us(long long *user, long long *system)
{
	struct rusage usage;

	if (getrusage(RUSAGE_THREAD, &usage))
		return -1;
	*user = usage.ru_utime.tv_sec * 1000000LL + usage.ru_utime.tv_usec;
	*system = usage.ru_stime.tv_sec * 1000000LL + usage.ru_stime.tv_usec;
	return 0;
}

/*
 * One datagram from each of `count` sources 127.0.0.0 + first + i (i < count), all with the
 * socket's own port, to `destination`: IP_PKTINFO's ipi_spec_dst picks the source address of
 * each (any 127/8 address is local on lo). The socket must be bound to INADDR_ANY.
 */
long rp_bench_send_from_sources(int fd, const struct sockaddr_in *destination, unsigned int first,
				unsigned int count)
{
	enum { batch = 256 };
	static __thread struct mmsghdr messages[batch];
	static __thread struct iovec vectors[batch];
	static __thread char controls[batch][CMSG_SPACE(sizeof(struct in_pktinfo))];
	static __thread unsigned int payloads[batch];
	long sent = 0;

	for (unsigned int start = 0; start < count; start += batch) {
		unsigned int n = count - start < batch ? count - start : batch;

		for (unsigned int i = 0; i < n; i++) {
			struct msghdr *header = &messages[i].msg_hdr;
			struct cmsghdr *cmsg;
			struct in_pktinfo *info;

			payloads[i] = first + start + i;
			vectors[i].iov_base = &payloads[i];
			vectors[i].iov_len = sizeof(payloads[i]);
			memset(header, 0, sizeof(*header));
			header->msg_name = (void *)destination;
			header->msg_namelen = sizeof(*destination);
			header->msg_iov = &vectors[i];
			header->msg_iovlen = 1;
			header->msg_control = controls[i];
			header->msg_controllen = sizeof(controls[i]);
			cmsg = CMSG_FIRSTHDR(header);
			cmsg->cmsg_level = IPPROTO_IP;
			cmsg->cmsg_type = IP_PKTINFO;
			cmsg->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
			info = (struct in_pktinfo *)CMSG_DATA(cmsg);
			memset(info, 0, sizeof(*info));
			info->ipi_spec_dst.s_addr = htonl(0x7f000000u + first + start + i);
		}
		for (unsigned int done = 0; done < n;) {
			int result = sendmmsg(fd, messages + done, n - done, 0);

			if (result < 0) {
				if (errno == EINTR || errno == EAGAIN || errno == ENOBUFS)
					continue;
				return sent > 0 ? sent : -1;
			}
			done += result;
			sent += result;
		}
	}
	return sent;
}

/*
 * Reads every datagram queued at `fd` (without waiting) and marks where each source landed:
 * slot_of[source - 127.0.0.0 - first] = slot + 1 for sources within count. Returns how many
 * were read.
 */
long rp_bench_drain_sources(int fd, unsigned char *slot_of, unsigned char slot, unsigned int first,
			    unsigned int count)
{
	enum { batch = 256 };
	static __thread struct mmsghdr messages[batch];
	static __thread struct iovec vectors[batch];
	static __thread struct sockaddr_in sources[batch];
	static __thread unsigned int payloads[batch];
	long read = 0;

	while (1) {
		int result;

		for (unsigned int i = 0; i < batch; i++) {
			vectors[i].iov_base = &payloads[i];
			vectors[i].iov_len = sizeof(payloads[i]);
			memset(&messages[i].msg_hdr, 0, sizeof(messages[i].msg_hdr));
			messages[i].msg_hdr.msg_name = &sources[i];
			messages[i].msg_hdr.msg_namelen = sizeof(sources[i]);
			messages[i].msg_hdr.msg_iov = &vectors[i];
			messages[i].msg_hdr.msg_iovlen = 1;
		}
		result = recvmmsg(fd, messages, batch, MSG_DONTWAIT, NULL);
		if (result <= 0)
			return read;
		for (int i = 0; i < result; i++) {
			unsigned int index = ntohl(sources[i].sin_addr.s_addr) - 0x7f000000u - first;

			if (index < count)
				slot_of[index] = slot + 1;
		}
		read += result;
	}
}
