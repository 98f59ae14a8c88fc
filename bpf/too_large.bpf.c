// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * too_large.bpf.c - for the tests only (never part of the data plane): a bounded loop
 * the verifier must walk iteration by iteration. The counter and the sum are known
 * constants at every step, so no two states at the loop's head are equal, nothing is
 * pruned, and the walk passes BPF_COMPLEXITY_LIMIT_INSNS (1M, kernel/bpf/verifier.c):
 * "BPF program is too large" on every kernel with bounded loops (5.3+).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "too_large.h"

SEC("sk_reuseport")
int rp_test_too_large(struct sk_reuseport_md *ctx)
{
	__u32 sum = 0;

	for (__u32 i = 0; i < RP_TEST_TOO_LARGE_ITERATIONS; i++) {
		sum += i;
		/* Keeps clang from folding the loop into its closed form. */
		asm volatile("" : "+r"(sum));
	}
	return sum == 1 ? SK_DROP : SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
