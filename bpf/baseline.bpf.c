// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * baseline.bpf.c - the two reference SK_REUSEPORT programs of the benchmarks.
 *
 * rp_base_pass does nothing; rp_base_fixed does only what every steering program
 * must do, one bpf_sk_select_reuseport() on a REUSEPORT_SOCKARRAY; rp_base_load also
 * copies out the IP addresses the way rp_dispatch does. Their run times, read from the
 * kernel's BPF statistics next to rp_dispatch's, bound what the steering logic itself
 * (parsing, hashing, bucket lookup, counters) adds.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "dispatch.h"
#include "baseline.h"

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} rp_base_sockets SEC(".maps");

SEC("sk_reuseport")
int rp_base_pass(struct sk_reuseport_md *ctx)
{
	return SK_PASS;
}

SEC("sk_reuseport")
int rp_base_fixed(struct sk_reuseport_md *ctx)
{
	__u32 slot = RP_BASELINE_FIXED_SLOT;

	if (bpf_sk_select_reuseport(ctx, &rp_base_sockets, &slot, 0))
		return SK_DROP;
	return SK_PASS;
}

SEC("sk_reuseport")
int rp_base_load(struct sk_reuseport_md *ctx)
{
	__u32 slot = RP_BASELINE_FIXED_SLOT, addrs[8];
	int ipv6 = ctx->eth_protocol == bpf_htons(ETH_P_IPV6);

	/* Offsets of saddr in the IPv4 and IPv6 headers, as in dispatch.bpf.c. */
	if (bpf_skb_load_bytes_relative(ctx, ipv6 ? 8 : 12, addrs, ipv6 ? 32 : 8, BPF_HDR_START_NET))
		return SK_DROP;
	if (bpf_sk_select_reuseport(ctx, &rp_base_sockets, &slot, 0))
		return SK_DROP;
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
