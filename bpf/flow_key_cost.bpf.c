// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * flow_key_cost.bpf.c - rp_dispatch's pinned path alone, twice, for one measurement.
 *
 * Exists only for bench item 7: what would a flow key sized per family save? Per packet it
 * does what rp_dispatch does for a flow whose record pins it (dispatch.bpf.c, flow_hash(),
 * flow_key() and pinned_slot()): the key from the packet (ports from ctx->data, addresses with
 * bpf_skb_load_bytes_relative()), its lookup in a hash table without preallocation, the
 * refresh of last_seen_ns and packets, the selection of the recorded slot. The Makefile builds
 * it twice (FLOW_KEY_BUILDS): with struct rp_flow_key, the 40 octets rp_flows uses for both
 * families, and with RP_FLOW_KEY_IPV4, struct rp_flow_key_ipv4, the 16 an IPv4 flow needs.
 * The code is the same otherwise. IPv4 UDP only: anything else is counted and dropped.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "dispatch.h"
#include "flow_key_cost.h"

#ifdef RP_FLOW_KEY_IPV4
typedef struct rp_flow_key_ipv4 bench_key_t;
#else
typedef struct rp_flow_key bench_key_t;
#endif

#define KEY_ADDR_WORDS (sizeof(((bench_key_t *)0)->addrs) / sizeof(__u32))
/* saddr, then daddr, from the IPv4 header's start (BPF_HDR_START_NET), as in dispatch.bpf.c. */
#define IPV4_SADDR_OFF 12

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} rp_key_cost_sockets SEC(".maps");

/* max_entries is set by user space before the load: that of the rp_flows it copies. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, RP_DEFAULT_TRACKED_FLOWS);
	__type(key, bench_key_t);
	__type(value, struct rp_flow);
} rp_key_cost_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_key_cost_stats);
} rp_key_cost_stats SEC(".maps");

/* As in dispatch.bpf.c: 1 where the kernel has bpf_ktime_get_coarse_ns(), set before the load. */
const volatile __u32 rp_coarse_clock = 0;

SEC("sk_reuseport")
int rp_key_cost_pinned(struct sk_reuseport_md *ctx)
{
	struct rp_key_cost_stats *stats;
	struct rp_flow *flow;
	bench_key_t key;
	__u32 zero = 0, slot;
	__u8 *p = ctx->data;

	stats = bpf_map_lookup_elem(&rp_key_cost_stats, &zero);
	if (!stats)
		return SK_DROP;
	if (ctx->eth_protocol != bpf_htons(ETH_P_IP) || ctx->ip_protocol != IPPROTO_UDP ||
	    ctx->data + 4 > ctx->data_end)
		goto missed;
	key.ports = (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
	if (bpf_skb_load_bytes_relative(ctx, IPV4_SADDR_OFF, key.addrs, 8, BPF_HDR_START_NET))
		goto missed;
	/* Every byte of the key written: 5.10's verifier refuses a lookup with uninitialized stack. */
	key.family = 4;
	key.protocol = IPPROTO_UDP;
	key.reserved = 0;
#pragma unroll
	for (int i = 2; i < KEY_ADDR_WORDS; i++)
		key.addrs[i] = 0;

	flow = bpf_map_lookup_elem(&rp_key_cost_flows, &key);
	if (!flow)
		goto missed;
	flow->last_seen_ns = rp_coarse_clock ? bpf_ktime_get_coarse_ns() : bpf_ktime_get_ns();
	flow->packets++;
	slot = flow->slot;
	if (bpf_sk_select_reuseport(ctx, &rp_key_cost_sockets, &slot, 0))
		goto missed;
	stats->pinned++;
	return SK_PASS;
missed:
	stats->missed++;
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
