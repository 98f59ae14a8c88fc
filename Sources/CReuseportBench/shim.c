// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#define _GNU_SOURCE
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
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
