// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * dispatch.bpf.c - SK_REUSEPORT program that steers each flow to a fixed slot.
 *
 * hash(tuple, seed) -> bucket = hash % bucket_count -> slot = rp_buckets[bucket]
 * -> bpf_sk_select_reuseport(rp_sockets, slot). An empty slot falls back to a
 * live one from rp_fallback, chosen by the same hash; with no live slot the packet
 * is dropped.
 *
 * The program never returns SK_PASS without a selection: the kernel would then
 * fall back to its own hash over *every* socket of the group, including a
 * foreign one that joined the port (net/core/sock_reuseport.c,
 * run_bpf_filter(): a NULL selection means "use reuseport_select_sock_by_hash").
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "dispatch.h"

#ifndef ENOENT
#define ENOENT 2
#endif

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_config);
} rp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RP_MAX_BUCKETS);
	__type(key, __u32);
	__type(value, rp_slot_t);
} rp_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RP_FALLBACK_BUCKETS);
	__type(key, __u32);
	__type(value, rp_slot_t);
} rp_fallback SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} rp_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rp_slot_stats);
} rp_slot_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_global_stats);
} rp_global_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rp_slot_state);
} rp_slot_state SEC(".maps");

/* Offsets from the network header (BPF_HDR_START_NET). */
#define IPV4_SADDR_OFF 12 /* saddr, daddr: 8 bytes */
#define IPV6_SADDR_OFF 8  /* saddr, daddr: 32 bytes */

static __always_inline struct rp_global_stats *global_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&rp_global_stats, &zero);
}

static __always_inline int drop_unparsable(void)
{
	struct rp_global_stats *g = global_stats();

	if (g)
		g->unparsable++;
	return SK_DROP;
}

/* Ports live at the start of the transport header, where ctx->data points. */
static __always_inline int load_ports(struct sk_reuseport_md *ctx, __u32 *ports)
{
	void *data = ctx->data;
	void *data_end = ctx->data_end;
	__u8 *p = data;

	if (data + 4 <= data_end) {
		*ports = (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
		return 0;
	}
	/* Not in the linear area: copy it out instead. */
	__u8 buf[4];

	if (bpf_skb_load_bytes(ctx, 0, buf, sizeof(buf)))
		return -1;
	*ports = (__u32)buf[0] << 24 | (__u32)buf[1] << 16 | (__u32)buf[2] << 8 | buf[3];
	return 0;
}

/*
 * Called once per family with a constant ipv6, so that each call inlines rp_flow_hash()
 * with a constant word count: the hash becomes straight-line code (no loop, no
 * BPF-to-BPF call), and IPv4 copies out 8 bytes of addresses, not 32.
 */
static __always_inline int family_hash(struct sk_reuseport_md *ctx, __u32 seed, __u32 proto, const int ipv6,
				       __u32 *hash)
{
	__u32 addrs[8], ports;

	if (load_ports(ctx, &ports))
		return -1;
	if (bpf_skb_load_bytes_relative(ctx, ipv6 ? IPV6_SADDR_OFF : IPV4_SADDR_OFF, addrs, ipv6 ? 32 : 8,
					BPF_HDR_START_NET))
		return -1;
	*hash = rp_flow_hash(seed, proto, ipv6, addrs, ports);
	return 0;
}

static __always_inline int flow_hash(struct sk_reuseport_md *ctx, __u32 seed, __u32 *hash)
{
	__u32 proto = ctx->ip_protocol;

	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return -1;
	if (ctx->eth_protocol == bpf_htons(ETH_P_IP))
		return family_hash(ctx, seed, proto, 0, hash);
	if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6))
		return family_hash(ctx, seed, proto, 1, hash);
	return -1;
}

/* hash % count, without the division when count is a power of two (the default is). */
static __always_inline __u32 bucket_of(__u32 hash, __u32 count)
{
	if ((count & (count - 1)) == 0)
		return hash & (count - 1);
	return hash % count;
}

static __always_inline void count(__u32 slot, struct sk_reuseport_md *ctx, int fallback)
{
	struct rp_slot_stats *s = bpf_map_lookup_elem(&rp_slot_stats, &slot);

	if (!s)
		return;
	s->packets++;
	/* ctx->len counts from the transport header; for TCP we only see the SYN. */
	if (ctx->ip_protocol == IPPROTO_UDP && ctx->len >= 8)
		s->bytes += ctx->len - 8;
	if (fallback)
		s->fallbacks++;
}

SEC("sk_reuseport")
int rp_dispatch(struct sk_reuseport_md *ctx)
{
	struct rp_global_stats *g;
	struct rp_config *cfg;
	__u32 zero = 0, hash, bucket, first;
	__u32 *slot;
	long err;

	cfg = bpf_map_lookup_elem(&rp_config, &zero);
	if (!cfg || cfg->abi_version != RP_ABI_VERSION || cfg->bucket_count == 0 ||
	    cfg->bucket_count > RP_MAX_BUCKETS) {
		g = global_stats();
		if (g)
			g->dropped_no_slot++;
		return SK_DROP;
	}
	if (flow_hash(ctx, cfg->seed, &hash))
		return drop_unparsable();

	bucket = bucket_of(hash, cfg->bucket_count);
	slot = bpf_map_lookup_elem(&rp_buckets, &bucket);
	if (slot) {
		__u32 s = *slot;

		err = bpf_sk_select_reuseport(ctx, &rp_sockets, &s, 0);
		if (err == 0) {
			count(s, ctx, 0);
			return SK_PASS;
		}
		if (err != -ENOENT) {
			g = global_stats();
			if (g)
				g->select_errors++;
		}
	}

	/*
	 * The bucket's slot is empty: take the flow's entry of the fallback table, which
	 * user space keeps spread over the slots that hold a socket. One flow always lands
	 * on the same live slot, and the flows of an empty slot spread over all live ones.
	 * A few consecutive entries are tried, in case a socket left the array before the
	 * table was rewritten. The loop is unrolled: a constant, small verification cost on
	 * every kernel, whatever RP_MAX_SLOTS is.
	 */
	if (cfg->live_count == 0)
		goto drop;
	first = rp_fallback_index(hash);
#pragma unroll
	for (__u32 i = 0; i < RP_FALLBACK_TRIES; i++) {
		__u32 index = (first + i) & (RP_FALLBACK_BUCKETS - 1);
		__u32 *fallback = bpf_map_lookup_elem(&rp_fallback, &index);
		__u32 s;

		if (!fallback)
			break;
		s = *fallback;
		if (bpf_sk_select_reuseport(ctx, &rp_sockets, &s, 0) == 0) {
			g = global_stats();
			if (g)
				g->fallbacks++;
			count(s, ctx, 1);
			return SK_PASS;
		}
	}

drop:
	g = global_stats();
	if (g)
		g->dropped_no_slot++;
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
