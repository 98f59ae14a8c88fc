// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The libc calls the benchmarks need that Swift's Glibc module leaves out. glibc declares
// sendmmsg/recvmmsg, struct mmsghdr, sched_setaffinity and RUSAGE_THREAD only under
// _GNU_SOURCE, which cannot be defined here (the headers would then disagree with Glibc's
// module): shim.c defines it and wraps the calls. Every symbol is prefixed rp_bench_.
#ifndef CREUSEPORT_BENCH_H
#define CREUSEPORT_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/epoll.h>

/* struct mmsghdr of <sys/socket.h>, same layout. */
struct rp_bench_mmsghdr {
	struct msghdr msg_hdr;
	unsigned int msg_len;
};

int rp_bench_sendmmsg(int fd, struct rp_bench_mmsghdr *messages, unsigned int count, int flags);
/* recvmmsg without a timeout. */
int rp_bench_recvmmsg(int fd, struct rp_bench_mmsghdr *messages, unsigned int count, int flags);

/* Pins the calling thread to one CPU; 0 or -1 with errno. */
int rp_bench_pin_thread(int cpu);
/* Sets bit i of mask (len bytes) for each CPU the process may run on; 0 or -1 with errno. */
int rp_bench_allowed_cpus(unsigned char *mask, size_t len);
/* User and system time of the calling thread, in microseconds (getrusage(RUSAGE_THREAD)). */
int rp_bench_thread_cpu_us(long long *user, long long *system);

static const int rp_bench_MSG_DONTWAIT = MSG_DONTWAIT;

struct sockaddr_in;
/* One datagram from each source 127.0.0.0 + first + i, i < count (IP_PKTINFO); datagrams sent or -1. */
long rp_bench_send_from_sources(int fd, const struct sockaddr_in *destination, unsigned int first,
				unsigned int count);
/* Reads what is queued at fd; slot_of[source - 127.0.0.0 - first] = slot + 1. Datagrams read. */
long rp_bench_drain_sources(int fd, unsigned char *slot_of, unsigned char slot, unsigned int first,
			    unsigned int count);

/* dispatch_untracked.bpf.o: bpf/dispatch.bpf.c built with RP_NO_FLOW_TRACKING (Makefile). */
const unsigned char *rp_bench_untracked_object(void);
size_t rp_bench_untracked_object_size(void);
/* dispatch_norefresh.bpf.o: the same with RP_BENCH_NO_REFRESH (a pinned packet leaves its record as it is). */
const unsigned char *rp_bench_norefresh_object(void);
size_t rp_bench_norefresh_object_size(void);

/* flow_key_ipv4.bpf.o (ipv4 != 0: the 16-octet IPv4 key) or flow_key_shared.bpf.o (the 40-octet
 * rp_flow_key), its size in *size: bpf/flow_key_cost.bpf.c, built twice by the Makefile (FLOW_KEY_BUILDS). */
const unsigned char *rp_bench_flow_key_object(int ipv4, size_t *size);

/* dispatch_reference.bpf.o: bpf/dispatch.bpf.c at BENCH_REFERENCE, from git (Makefile); NULL and 0
 * when it was not built. */
const unsigned char *rp_bench_reference_object(void);
size_t rp_bench_reference_object_size(void);
/* Its revision (short hash), "" when not built. */
const char *rp_bench_reference_revision(void);
/* Writes the rp_config (key 0) of that revision into out: its size, or 0 (not built, or too small). */
size_t rp_bench_reference_config(unsigned char *out, size_t capacity, uint32_t seed, uint32_t bucket_count,
				 uint32_t slot_count);

#endif
