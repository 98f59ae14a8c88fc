/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * baseline.h - names shared by bpf/baseline.bpf.c and the benchmark suite.
 *
 * The baselines are not part of the data plane: they exist so that the cost of
 * rp_dispatch can be measured against the least an SK_REUSEPORT program costs,
 * with the same run-time statistics, in the same run (docs/benchmarks.md).
 */
#ifndef REUSEPORT_BASELINE_H
#define REUSEPORT_BASELINE_H

/* Returns SK_PASS without a selection: the kernel then picks by its own hash. */
#define RP_PROG_BASELINE_PASS "rp_base_pass"
/* Selects the socket at RP_BASELINE_FIXED_SLOT of its array, nothing else. */
#define RP_PROG_BASELINE_FIXED "rp_base_fixed"
/*
 * Reads the packet's addresses as rp_dispatch does (one bpf_skb_load_bytes_relative():
 * the network header lies before ctx->data, out of reach of direct packet access), then
 * selects like rp_base_fixed: the part of the steering cost every tuple hash must pay.
 */
#define RP_PROG_BASELINE_LOAD "rp_base_load"
/* REUSEPORT_SOCKARRAY of rp_base_fixed and rp_base_load, RP_MAX_SLOTS entries like rp_sockets. */
#define RP_MAP_BASELINE_SOCKETS "rp_base_sockets"
#define RP_BASELINE_FIXED_SLOT 0

#endif /* REUSEPORT_BASELINE_H */
