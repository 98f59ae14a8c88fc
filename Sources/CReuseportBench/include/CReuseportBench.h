// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The libc declarations the benchmarks need that Swift's Glibc module leaves out:
// sendmmsg/recvmmsg, struct mmsghdr, sched_setaffinity and RUSAGE_THREAD (glibc
// declares them only under _GNU_SOURCE), and epoll.
#ifndef CREUSEPORT_BENCH_H
#define CREUSEPORT_BENCH_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sched.h>

/* Flags of the calls above, as plain ints (Swift imports some as enum cases). */
static const int rp_bench_MSG_WAITFORONE = MSG_WAITFORONE;
static const int rp_bench_MSG_DONTWAIT = MSG_DONTWAIT;
/* RUSAGE_THREAD of <sys/resource.h>: including it here clashes with Glibc's module. */
static const int rp_bench_RUSAGE_THREAD = 1;

#endif
