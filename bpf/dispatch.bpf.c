// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * dispatch.bpf.c - SK_REUSEPORT program that steers each flow to a fixed slot.
 *
 * hash(tuple, seed) -> bucket = hash % bucket_count -> slot = rp_buckets[bucket]
 * -> bpf_sk_select_reuseport(rp_sockets, slot). An empty slot falls back to a
 * live one from rp_fallback, chosen by the same hash; with no live slot the packet
 * is dropped. A UDP service with QUIC steering (rp_quic_config) first tries the slot
 * named by the packet's QUIC connection ID (quic_dispatch()).
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_quic_config);
} rp_quic_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_quic_stats);
} rp_quic_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct rp_quic_slot_stats);
} rp_quic_slot_stats SEC(".maps");

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

/*
 * Where the flow of a hash goes: its bucket's slot, else a live slot from the fallback
 * table, else nowhere (drop). The flow hash and the hash of a QUIC long header's DCID both
 * end here. *selected is the slot that took the packet.
 */
static __always_inline int select_by_hash(struct sk_reuseport_md *ctx, struct rp_config *cfg, __u32 hash,
					  __u32 *selected)
{
	struct rp_global_stats *g;
	__u32 bucket, first;
	__u32 *slot;
	long err;

	bucket = bucket_of(hash, cfg->bucket_count);
	slot = bpf_map_lookup_elem(&rp_buckets, &bucket);
	if (slot) {
		__u32 s = rp_bucket_slot(*slot);

		err = bpf_sk_select_reuseport(ctx, &rp_sockets, &s, 0);
		if (err == 0) {
			count(s, ctx, 0);
			*selected = s;
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
			*selected = s;
			return SK_PASS;
		}
	}

drop:
	g = global_stats();
	if (g)
		g->dropped_no_slot++;
	return SK_DROP;
}

/* What quic_dispatch() leaves to the rest of the program. */
enum {
	QUIC_BY_FLOW = -1, /* steer by the flow hash, as any UDP datagram */
	QUIC_BY_HASH = -2, /* steer by the hash it computed (a long header's DCID) */
};

/* UDP payload octets from ctx->data, which points at the UDP header. */
#define UDP_HEADER_LEN 8

/*
 * Copies the first 8 * words octets of the UDP payload into head: straight from the packet,
 * 8 octets a load, when they are in the linear area (direct packet access, bounds checked
 * against data_end; the loads need not be aligned where the architecture has efficient
 * unaligned access, as x86-64 and arm64 have: check_pkt_ptr_alignment() in
 * kernel/bpf/verifier.c), else with bpf_skb_load_bytes() (a payload that is not in the skb's
 * linear area, but in its page fragments). words is a constant at each call.
 */
static __always_inline int quic_copy_head(struct sk_reuseport_md *ctx, __u64 *head, const __u32 words)
{
	void *data = ctx->data;
	void *data_end = ctx->data_end;

	if (data + UDP_HEADER_LEN + 8 * words <= data_end) {
#pragma unroll
		for (__u32 i = 0; i < words; i++)
			head[i] = *(__u64 *)(data + UDP_HEADER_LEN + 8 * i);
		return 0;
	}
	return bpf_skb_load_bytes(ctx, UDP_HEADER_LEN, head, 8 * words) ? -1 : 0;
}

/* Sends the packet to the slot its CID names, if that slot holds a socket. */
static __always_inline int quic_select_slot(struct sk_reuseport_md *ctx, __u32 slot, struct rp_quic_stats *qs)
{
	struct rp_quic_slot_stats *ss;
	struct rp_global_stats *g;
	long err;

	err = bpf_sk_select_reuseport(ctx, &rp_sockets, &slot, 0);
	if (err == 0) {
		count(slot, ctx, 0);
		ss = bpf_map_lookup_elem(&rp_quic_slot_stats, &slot);
		if (ss)
			ss->cid_steered++;
		qs->cid_steered++;
		return SK_PASS;
	}
	if (err != -ENOENT) {
		g = global_stats();
		if (g)
			g->select_errors++;
	}
	return QUIC_BY_FLOW;
}

/*
 * QUIC-LB steering (bpf/dispatch.h has the layout): a short header goes to the slot its
 * DCID's server ID names while that slot holds a socket, else (counted) to flow steering;
 * a long header goes to the slot its DCID names the same way (a client's Handshake packets
 * carry the server's CID), else by the hash of its DCID, so that all packets of one
 * handshake meet one worker even if the client's address changes meanwhile. Version
 * negotiation and unparsable packets are counted and dropped: a server has nothing to do
 * with them. Returns SK_PASS, SK_DROP, QUIC_BY_FLOW, or QUIC_BY_HASH with *hash set.
 *
 * Not inlined: a BPF-to-BPF call returns to one caller state whatever path the callee took, so
 * the verifier walks the flow steering after it once per verdict, not once per QUIC path
 * (4,269 instructions processed inlined, against the budget's 50,000).
 */
static __noinline int quic_dispatch(struct sk_reuseport_md *ctx, __u32 seed, struct rp_quic_config *qc,
				    __u32 *hash)
{
	__u64 words[RP_QUIC_HEADER_BYTES / 8] = {};
	__u8 *head = (__u8 *)words;
	struct rp_quic_header h;
	struct rp_quic_stats *qs;
	__u32 zero = 0, payload, slot;
	int verdict;

	qs = bpf_map_lookup_elem(&rp_quic_stats, &zero);
	if (!qs)
		return QUIC_BY_FLOW;
	payload = ctx->len >= UDP_HEADER_LEN ? ctx->len - UDP_HEADER_LEN : 0;
	if (payload >= RP_QUIC_HEADER_BYTES) {
		if (quic_copy_head(ctx, words, RP_QUIC_HEADER_BYTES / 8))
			goto unparsable;
	} else if (payload >= RP_QUIC_SHORT_HEADER_BYTES) {
		if (quic_copy_head(ctx, words, RP_QUIC_SHORT_HEADER_BYTES / 8))
			goto unparsable;
	}
	rp_quic_parse(qc, head, payload, &h);
	if (h.kind == RP_QUIC_SHORT) {
		slot = rp_quic_server_slot(qc, head + 1);
		if (slot == RP_QUIC_NO_SLOT) {
			qs->unknown_cid++;
			return QUIC_BY_FLOW;
		}
		verdict = quic_select_slot(ctx, slot, qs);
		if (verdict == QUIC_BY_FLOW)
			qs->fallbacks++;
		return verdict;
	}
	if (h.kind == RP_QUIC_LONG) {
		if (h.initial)
			qs->initials++;
		if (h.dcid_length == qc->cid_length) {
			slot = rp_quic_server_slot(qc, head + 6);
			if (slot != RP_QUIC_NO_SLOT && quic_select_slot(ctx, slot, qs) == SK_PASS)
				return SK_PASS;
		}
		qs->dcid_hashed++;
		*hash = rp_quic_dcid_hash(seed, head + 6, h.dcid_length);
		return QUIC_BY_HASH;
	}
	if (h.kind == RP_QUIC_VERSION_NEGOTIATION) {
		qs->version_negotiation++;
		return SK_DROP;
	}
unparsable:
	qs->unparsable++;
	return SK_DROP;
}

SEC("sk_reuseport")
int rp_dispatch(struct sk_reuseport_md *ctx)
{
	struct rp_quic_slot_stats *ss;
	struct rp_quic_config *qc;
	struct rp_global_stats *g;
	struct rp_config *cfg;
	__u32 zero = 0, hash = 0, selected = 0;
	int verdict = QUIC_BY_FLOW, by_dcid;

	cfg = bpf_map_lookup_elem(&rp_config, &zero);
	if (!cfg || cfg->abi_version != RP_ABI_VERSION || cfg->bucket_count == 0 ||
	    cfg->bucket_count > RP_MAX_BUCKETS) {
		g = global_stats();
		if (g)
			g->dropped_no_slot++;
		return SK_DROP;
	}
	if (ctx->ip_protocol == IPPROTO_UDP) {
		qc = bpf_map_lookup_elem(&rp_quic_config, &zero);
		if (qc && qc->enabled)
			verdict = quic_dispatch(ctx, cfg->seed, qc, &hash);
	}
	if (verdict == QUIC_BY_FLOW) {
		if (flow_hash(ctx, cfg->seed, &hash))
			return drop_unparsable();
	} else if (verdict != QUIC_BY_HASH) {
		return verdict;
	}
	by_dcid = verdict == QUIC_BY_HASH;
	verdict = select_by_hash(ctx, cfg, hash, &selected);
	if (by_dcid && verdict == SK_PASS) {
		ss = bpf_map_lookup_elem(&rp_quic_slot_stats, &selected);
		if (ss)
			ss->dcid_hashed++;
	}
	return verdict;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
