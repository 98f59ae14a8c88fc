// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * dispatch.bpf.c - SK_REUSEPORT program that steers each flow to a fixed slot.
 *
 * hash(tuple, seed) -> bucket = hash % bucket_count -> slot = rp_buckets[bucket]
 * -> bpf_sk_select_reuseport(rp_sockets, slot). An empty slot falls back to a
 * live one from rp_fallback, chosen by the same hash; with no live slot the packet
 * is dropped. A UDP service with QUIC steering (rp_config.quic) first tries the slot
 * named by the packet's QUIC connection ID (quic_dispatch()).
 *
 * While the daemon changes the placement (a rescale, a restore after failover), the
 * buckets that change carry flags (RP_BUCKET_*): first the program records each UDP flow
 * it sees there with the slot it lands on (learning, for one idle timeout), then, once
 * the buckets point at their new slots, it sends each recorded flow to its recorded slot
 * (pinned) until the record goes idle. Buckets without flags, which is all of them in
 * steady state, cost nothing more than reading the bucket.
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
#ifndef EEXIST
#define EEXIST 17
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

/* max_entries is the service's max_tracked_flows, set by user space before the load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, RP_DEFAULT_TRACKED_FLOWS);
	__type(key, struct rp_flow_key);
	__type(value, struct rp_flow);
} rp_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, RP_DEFAULT_TRACKED_FLOWS);
	__type(key, struct rp_flow_key);
	__type(value, __u32);
} rp_untracked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_flow_stats);
} rp_flow_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rp_record_budget);
} rp_record_budget SEC(".maps");

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

/*
 * RP_CONST_COARSE_CLOCK: 1 where the kernel has bpf_ktime_get_coarse_ns() (5.11), set by user
 * space before the load. libbpf freezes .rodata, so the verifier reads it as a constant and
 * never walks the branch it rules out: on 5.10 the call to a helper that kernel does not know is
 * dead code, not a refusal (kernel/bpf/verifier.c, bpf_map_direct_read() and the dead-code
 * sanitizing after the walk).
 */
const volatile __u32 rp_coarse_clock = 0;

/*
 * The clock of flow records and of their rate bound: CLOCK_MONOTONIC as user space reads it.
 * The coarse one (updated once a tick) saves most of what a record's refresh costs on every
 * pinned packet (bench item 7); a tick of lag is nothing against an idle timeout of 100 ms or
 * more, and it only makes a record look older, never younger.
 */
static __always_inline __u64 record_clock(void)
{
	if (rp_coarse_clock)
		return bpf_ktime_get_coarse_ns();
	return bpf_ktime_get_ns();
}

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
 * BPF-to-BPF call), and IPv4 copies out 8 bytes of addresses, not 32. The ports and
 * addresses land in the flow key, where a change needs them; the rest of the key is
 * written only then (flow_key()).
 */
static __always_inline int family_hash(struct sk_reuseport_md *ctx, __u32 seed, __u32 proto, const int ipv6,
				       struct rp_flow_key *key, __u32 *hash)
{
	if (load_ports(ctx, &key->ports))
		return -1;
	if (bpf_skb_load_bytes_relative(ctx, ipv6 ? IPV6_SADDR_OFF : IPV4_SADDR_OFF, key->addrs, ipv6 ? 32 : 8,
					BPF_HDR_START_NET))
		return -1;
	*hash = rp_flow_hash(seed, proto, ipv6, key->addrs, key->ports);
	return ipv6 ? 6 : 4;
}

/* The flow's hash, with its ports and addresses in key: returns the IP version, or -1. */
static __always_inline int flow_hash(struct sk_reuseport_md *ctx, __u32 seed, struct rp_flow_key *key, __u32 *hash)
{
	__u32 proto = ctx->ip_protocol;

	if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
		return -1;
	if (ctx->eth_protocol == bpf_htons(ETH_P_IP))
		return family_hash(ctx, seed, proto, 0, key, hash);
	if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6))
		return family_hash(ctx, seed, proto, 1, key, hash);
	return -1;
}

/*
 * Completes the key of a UDP flow that flow_hash() filled (family 4 or 6), for rp_flows: only
 * while a change runs, so steady state writes nothing of it beyond what the hash reads.
 * family is a constant on each of the verifier's paths (flow_hash() returns one per family):
 * on each, every byte of the key is written, as a map lookup needs on kernels without
 * allow_uninit_stack (5.10 among them; IPv4 zeroes the 6 address words it does not use).
 */
static __always_inline void flow_key(struct rp_flow_key *key, int family)
{
	key->family = family;
	key->protocol = IPPROTO_UDP;
	key->reserved = 0;
	if (family == 4) {
#pragma unroll
		for (int i = 2; i < 8; i++)
			key->addrs[i] = 0;
	}
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
 * (4,269 instructions processed inlined, against the budget's 50,000). qc points into the
 * rp_config value the caller looked up: the call costs no lookup of its own.
 */
static __noinline int quic_dispatch(struct sk_reuseport_md *ctx, __u32 seed, const struct rp_quic_config *qc,
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

static __always_inline struct rp_flow_stats *flow_stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&rp_flow_stats, &zero);
}

/*
 * The rate bound on new records: one token bucket for the service, whose credit is time, at
 * most one second of it. Shared by every CPU (traffic may arrive on one queue only), updated
 * without atomics: CPUs racing on it may let a few more records through than the bound, never
 * fewer; it is touched only by packets of new flows in learning buckets. A flood of new tuples
 * while a change learns gets at most that many records per second; the rest is counted, and
 * a real flow whose packet was refused is recorded at one of its next packets.
 */
static __always_inline int take_record_credit(__u32 cost_ns, __u64 now)
{
	struct rp_record_budget *budget;
	__u32 zero = 0;
	__u64 credit;

	if (cost_ns == 0)
		return 1;
	budget = bpf_map_lookup_elem(&rp_record_budget, &zero);
	if (!budget)
		return 0;
	credit = budget->credit_ns + (now - budget->last_ns);
	if (credit > 1000000000ull || now < budget->last_ns)
		credit = 1000000000ull;
	budget->last_ns = now;
	if (credit < cost_ns) {
		budget->credit_ns = credit;
		return 0;
	}
	budget->credit_ns = credit - cost_ns;
	return 1;
}

/*
 * A flow of a learning bucket landed on `slot` and has no record: record it. When rp_flows
 * is full the flow is not recorded (it follows the table at the switch) and is counted once,
 * through a marker in rp_untracked.
 */
static __always_inline void record_flow(const struct rp_flow_key *key, __u32 slot, __u32 cost_ns)
{
	struct rp_flow_stats *fs = flow_stats();
	__u64 now = record_clock();
	struct rp_flow flow = { .slot = slot, .packets = 1, .last_seen_ns = now };
	__u32 marker = 1;
	long err;

	if (!fs)
		return;
	if (bpf_map_lookup_elem(&rp_untracked, key))
		return;
	if (!take_record_credit(cost_ns, now)) {
		fs->rate_refused++;
		return;
	}
	err = bpf_map_update_elem(&rp_flows, key, &flow, BPF_NOEXIST);
	if (err == 0) {
		fs->recorded++;
		return;
	}
	if (err == -EEXIST)
		return; /* another CPU recorded it a moment ago */
	if (bpf_map_update_elem(&rp_untracked, key, &marker, BPF_NOEXIST) == 0)
		fs->untracked++;
	else
		fs->untracked_uncounted++;
}

/*
 * A flow of a switched bucket with a record goes to its recorded slot while that slot holds a
 * socket. Returns the slot, or -1: no record, or its slot is gone (the flow follows the table).
 */
static __always_inline long pinned_slot(struct sk_reuseport_md *ctx, const struct rp_flow_key *key)
{
	struct rp_flow_stats *fs;
	struct rp_flow *flow = bpf_map_lookup_elem(&rp_flows, key);
	__u32 s;

	if (!flow)
		return -1;
	/* RP_BENCH_NO_REFRESH: a build for the benchmarks only, to measure what the refresh costs. */
#ifndef RP_BENCH_NO_REFRESH
	flow->last_seen_ns = record_clock();
	flow->packets++;
#endif
	s = flow->slot;
	fs = flow_stats();
	if (bpf_sk_select_reuseport(ctx, &rp_sockets, &s, 0) == 0) {
		if (fs)
			fs->pinned++;
		return s;
	}
	if (fs)
		fs->stale++;
	return -1;
}

/* A long header steered by its DCID's hash took `slot`: count it per slot. */
static __always_inline void count_dcid_hashed(__u32 slot)
{
	struct rp_quic_slot_stats *ss = bpf_map_lookup_elem(&rp_quic_slot_stats, &slot);

	if (ss)
		ss->dcid_hashed++;
}

static __always_inline int drop_no_slot(void)
{
	struct rp_global_stats *g = global_stats();

	if (g)
		g->dropped_no_slot++;
	return SK_DROP;
}

/* Selects the socket at slot: 0, or the helper's error (other than ENOENT, an empty slot, counted). */
static __always_inline long select_slot(struct sk_reuseport_md *ctx, __u32 slot)
{
	struct rp_global_stats *g;
	long err = bpf_sk_select_reuseport(ctx, &rp_sockets, &slot, 0);

	if (err && err != -ENOENT) {
		g = global_stats();
		if (g)
			g->select_errors++;
	}
	return err;
}

/*
 * The bucket's slot is empty: take the flow's entry of the fallback table, which user space
 * keeps spread over the slots that hold a socket. One flow always lands on the same live slot,
 * and the flows of an empty slot spread over all live ones. A few consecutive entries are tried,
 * in case a socket left the array before the table was rewritten. The loop is unrolled: a
 * constant, small verification cost on every kernel, whatever RP_MAX_SLOTS is. Returns the slot
 * selected, or -1.
 */
static __always_inline long fallback_slot(struct sk_reuseport_md *ctx, const struct rp_config *cfg, __u32 hash)
{
	__u32 first;

	if (cfg->live_count == 0)
		return -1;
	first = rp_fallback_index(hash);
#pragma unroll
	for (__u32 i = 0; i < RP_FALLBACK_TRIES; i++) {
		__u32 index = (first + i) & (RP_FALLBACK_BUCKETS - 1);
		__u32 *fallback = bpf_map_lookup_elem(&rp_fallback, &index);
		__u32 s;

		if (!fallback)
			break;
		s = *fallback;
		if (bpf_sk_select_reuseport(ctx, &rp_sockets, &s, 0) == 0)
			return s;
	}
	return -1;
}

/* A flow steered to `slot` by the fallback table: counted globally and for the slot. */
static __always_inline int pass_fallback(struct sk_reuseport_md *ctx, __u32 slot)
{
	struct rp_global_stats *g = global_stats();

	if (g)
		g->fallbacks++;
	count(slot, ctx, 1);
	return SK_PASS;
}

/*
 * A service without QUIC, and no change running: rp_config.flags is 0. The tuple's hash, its
 * bucket's slot, else the fallback table: nothing else is read or tested, so such a service
 * pays nothing for what it does not use (bench item 2 measures it against the program before
 * QUIC and flow tracking, 746545c).
 */
static __always_inline int steer_steady(struct sk_reuseport_md *ctx, const struct rp_config *cfg)
{
	struct rp_flow_key key;
	__u32 hash, bucket, *value;
	long s;

	if (flow_hash(ctx, cfg->seed, &key, &hash) < 0)
		return drop_unparsable();
	bucket = bucket_of(hash, cfg->bucket_count);
	value = bpf_map_lookup_elem(&rp_buckets, &bucket);
	if (value) {
		__u32 slot = rp_bucket_slot(*value);

		if (select_slot(ctx, slot) == 0) {
			count(slot, ctx, 0);
			return SK_PASS;
		}
	}
	s = fallback_slot(ctx, cfg, hash);
	if (s < 0)
		return drop_no_slot();
	return pass_fallback(ctx, s);
}

/* The same with QUIC steering first (RP_CONFIG_QUIC), and flow records while a change runs (RP_CONFIG_CHANGING). */
static __always_inline int steer_flagged(struct sk_reuseport_md *ctx, const struct rp_config *cfg)
{
	struct rp_flow_key key;
	__u32 hash = 0, bucket, flags = 0;
	__u32 *value;
	long pinned, s;
	int verdict = QUIC_BY_FLOW, family = 0;

	/*
	 * QUIC first: a short header whose CID names a live slot goes there, a long header is
	 * steered by its DCID's hash (no flow record: its connection ID, not its tuple, is what
	 * must stay put), anything else by its flow.
	 */
	if ((cfg->flags & RP_CONFIG_QUIC) && ctx->ip_protocol == IPPROTO_UDP)
		verdict = quic_dispatch(ctx, cfg->seed, &cfg->quic, &hash);
	if (verdict == QUIC_BY_FLOW) {
		family = flow_hash(ctx, cfg->seed, &key, &hash);
		if (family < 0)
			return drop_unparsable();
	} else if (verdict != QUIC_BY_HASH) {
		return verdict;
	}
	/* By a DCID's hash the key is not filled: flags stay 0, and nothing below reads it then. */

	bucket = bucket_of(hash, cfg->bucket_count);
	value = bpf_map_lookup_elem(&rp_buckets, &bucket);
	if (value) {
		__u32 slot = rp_bucket_slot(*value);

		/*
		 * Records are for UDP only: a TCP connection, once accepted, never moves.
		 * RP_NO_FLOW_TRACKING builds the program as it was before flow tracking, for the
		 * benchmark that measures what tracking costs (Makefile).
		 */
#ifndef RP_NO_FLOW_TRACKING
		if ((cfg->flags & RP_CONFIG_CHANGING) && verdict == QUIC_BY_FLOW && ctx->ip_protocol == IPPROTO_UDP)
			flags = *value & RP_BUCKET_FLAGS;
#endif
		if (flags) {
			flow_key(&key, family);
			pinned = pinned_slot(ctx, &key);
			if (pinned >= 0) {
				count(pinned, ctx, 0);
				return SK_PASS;
			}
		}
		if (select_slot(ctx, slot) == 0) {
			if (flags & RP_BUCKET_LEARN)
				record_flow(&key, slot, cfg->record_cost_ns);
			if (verdict == QUIC_BY_HASH)
				count_dcid_hashed(slot);
			count(slot, ctx, 0);
			return SK_PASS;
		}
	}
	s = fallback_slot(ctx, cfg, hash);
	if (s < 0)
		return drop_no_slot();
	if (flags & RP_BUCKET_LEARN)
		record_flow(&key, s, cfg->record_cost_ns);
	if (verdict == QUIC_BY_HASH)
		count_dcid_hashed(s);
	return pass_fallback(ctx, s);
}

static __always_inline int dispatch(struct sk_reuseport_md *ctx)
{
	struct rp_config *cfg;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&rp_config, &zero);
	if (!cfg || cfg->abi_version != RP_ABI_VERSION || cfg->bucket_count == 0 ||
	    cfg->bucket_count > RP_MAX_BUCKETS)
		return drop_no_slot();
	if (cfg->flags == 0)
		return steer_steady(ctx, cfg);
	return steer_flagged(ctx, cfg);
}

SEC("sk_reuseport")
int rp_dispatch(struct sk_reuseport_md *ctx)
{
	return dispatch(ctx);
}

/*
 * A TCP listener that closes with connections still in its accept queue, or handshakes in
 * flight, would reset them. With this variant attached (expected attach type
 * BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, 5.14) the kernel asks the program where to move each
 * instead (net/core/sock_reuseport.c, reuseport_migrate_sock(); the skb is then an empty
 * one, so the tuple cannot be read): it goes to a live slot of the fallback table, chosen by
 * the request's own hash, which a closing (leaving) slot is no longer in. User space loads
 * this one where the kernel has it and rp_dispatch elsewhere.
 */
SEC("sk_reuseport/migrate")
int rp_dispatch_migrate(struct sk_reuseport_md *ctx)
{
	struct rp_global_stats *g;
	struct rp_config *cfg;
	__u32 zero = 0;

	if (!ctx->migrating_sk)
		return dispatch(ctx);
	g = global_stats();
	cfg = bpf_map_lookup_elem(&rp_config, &zero);
	if (cfg && cfg->abi_version == RP_ABI_VERSION && fallback_slot(ctx, cfg, ctx->hash) >= 0) {
		if (g)
			g->migrated++;
		return SK_PASS;
	}
	if (g)
		g->migrate_failed++;
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
