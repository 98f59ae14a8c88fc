/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * dispatch.h - the ABI between the SK_REUSEPORT steering program and user space.
 *
 * This header is the single source of every map name, key/value layout, enum and
 * limit shared by bpf/dispatch.bpf.c and the Swift side (through the CReuseportABI
 * C module). Swift never restates anything defined here; it checks the layouts
 * again at run time when it opens a map (ReuseportKit/BPFMap.swift, DispatchMaps.swift).
 *
 * The flow hash is defined here too, once, as static inline functions that the
 * kernel program compiles and Swift calls (ReuseportKit/FlowHash.swift), so the
 * program and the user-space predictor cannot drift. The vectors in bpf/testdata
 * pin the hash itself (Tests/ReuseportKitTests/FlowHashTests.swift).
 */
#ifndef REUSEPORT_DISPATCH_H
#define REUSEPORT_DISPATCH_H

#include <linux/types.h>

/*
 * ABI version, stored in the config map: user space refuses maps of another.
 * 2: the fallback table (rp_fallback, rp_config.live_count) replaced the probe loop.
 * 3: rp_slot_state grew stalls and watchdog_restarts (40 bytes); RP_WORKER_STALLED.
 * 4: flow tracking: rp_buckets values carry transition flags (RP_BUCKET_*), rp_flows,
 *    rp_untracked, rp_flow_stats, rp_record_budget, rp_transition, rp_next_buckets;
 *    rp_config.record_cost_ns; rp_slot_state grew records and flags (48 bytes);
 *    rp_global_stats grew migrated and migrate_failed (48 bytes); rp_dispatch_migrate.
 * 5: QUIC-LB connection-ID steering: rp_quic_config, rp_quic_stats, rp_quic_slot_stats (new maps;
 *    the others keep their layouts).
 * 6: generations: rp_transition grew working_generation and last_generation (56 bytes), kept
 *    with or without a change in progress; rp_slot_state.generation is filled.
 * 7: rp_slot_state grew start_time (56 bytes): with the pid, it names the worker a later daemon
 *    adopts.
 * 8: one configuration lookup per packet: rp_config holds the QUIC layout (rp_config.quic; the
 *    rp_quic_config map is gone) and flags (RP_CONFIG_CHANGING: the program reads the bucket flags
 *    only while a change runs; RP_CONFIG_QUIC); rp_config is 48 bytes. rp_slot_state,
 *    rp_transition and rp_next_buckets left the object: the program never read them, and bumps
 *    3, 6 and 7 changed only them. They are the daemon's records now (bpf/records.h, records
 *    version 2), created by the daemon and versioned apart. Map sizes follow the configuration:
 *    the slot-indexed maps (rp_sockets, rp_slot_stats, rp_quic_slot_stats) hold the service's
 *    slot capacity (RP_SLOTS_PER_WORKER per worker, a power of two, RP_MAX_SLOTS at most), and
 *    rp_flows by default RP_TRACKED_FLOWS_PER_WORKER records per worker, rp_untracked a quarter
 *    of rp_flows' entries (at least RP_MIN_UNTRACKED_MARKERS): the program bounds every index by
 *    the map's own size (the array lookup and bpf_sk_select_reuseport() check it).
 */
#define RP_ABI_VERSION 8

/* Limits. Map sizes are fixed at load time. */
#define RP_MAX_SLOTS 1024     /* sockets (= workers) per listener */
/*
 * The slot-indexed maps hold the next power of two of at least RP_SLOTS_PER_WORKER slots per
 * worker and RP_MIN_SLOT_CAPACITY, up to RP_MAX_SLOTS: room for an upgrade's new generation
 * beside the old ones still draining, a canary, a scale-up (ReuseportKit/Limits.swift, SlotCapacity).
 */
#define RP_SLOTS_PER_WORKER 4
#define RP_MIN_SLOT_CAPACITY 16
#define RP_MAX_BUCKETS 65536  /* entries in the bucket table */
#define RP_DEFAULT_BUCKETS 4096
/*
 * The fallback table: where a flow goes when its bucket's slot holds no socket. A
 * power of two, so the index is a mask; 4 entries per slot even at RP_MAX_SLOTS.
 */
#define RP_FALLBACK_BUCKETS 4096
/*
 * Consecutive fallback entries tried before a packet is dropped. A constant, unrolled:
 * the verifier's cost of the program must not grow with RP_MAX_SLOTS (a loop of up to
 * 1024 selects was refused as too large by the 7.2 verifier). More than one covers a
 * socket that left the array before user space rewrote the table.
 */
#define RP_FALLBACK_TRIES 4
/*
 * Flow records kept while a placement change is in progress (rp_flows): by default
 * RP_TRACKED_FLOWS_PER_WORKER per worker the service starts with, at most
 * RP_DEFAULT_TRACKED_FLOWS. Each costs about 130 bytes of kernel memory while it exists (a hash
 * table without preallocation), but the table's buckets, 16 bytes per entry rounded up to a
 * power of two, are allocated when the map is made and held in steady state too
 * (kernel/bpf/hashtab.c, htab_map_alloc()): 512 KiB for 32,768 records, 4 MiB for 262,144.
 * Configurable per service (max_tracked_flows).
 */
#define RP_TRACKED_FLOWS_PER_WORKER 8192
#define RP_DEFAULT_TRACKED_FLOWS 262144
#define RP_MAX_TRACKED_FLOWS 16777216
/*
 * rp_untracked holds a quarter of max_tracked_flows markers, at least this many, so that the
 * flows a full table turns away are counted once each up to that many (the others' packets are
 * counted in untracked_uncounted).
 */
#define RP_MIN_UNTRACKED_MARKERS 1024

/* Map names as libbpf sees them in the object (and the file names of the pins). */
#define RP_MAP_CONFIG "rp_config"
#define RP_MAP_BUCKETS "rp_buckets"
#define RP_MAP_SOCKETS "rp_sockets"
#define RP_MAP_SLOT_STATS "rp_slot_stats"
#define RP_MAP_GLOBAL_STATS "rp_global_stats"
#define RP_MAP_FALLBACK "rp_fallback"
#define RP_MAP_FLOWS "rp_flows"
#define RP_MAP_UNTRACKED "rp_untracked"
#define RP_MAP_FLOW_STATS "rp_flow_stats"
#define RP_MAP_RECORD_BUDGET "rp_record_budget"
#define RP_MAP_QUIC_STATS "rp_quic_stats"
#define RP_MAP_QUIC_SLOT_STATS "rp_quic_slot_stats"
/*
 * A constant of the program that user space sets before the load (a `const volatile __u32` in
 * .rodata): 1 where the kernel has bpf_ktime_get_coarse_ns() (5.11), which then stamps flow
 * records (ReuseportKit/CoarseClock.swift).
 */
#define RP_CONST_COARSE_CLOCK "rp_coarse_clock"
#define RP_PROG_DISPATCH "rp_dispatch"
#define RP_PROG_DISPATCH_MIGRATE "rp_dispatch_migrate"

/*
 * The service's QUIC-LB layout (the QUIC section below says what each field means), held in
 * rp_config.quic and written by ServiceDataPlane from its QuicSteering; all zero: steering off.
 */
struct rp_quic_config {
	__u32 enabled;          /* 1: steer UDP by QUIC connection ID; 0: flow steering only */
	__u32 host_prefix;      /* the prefix_length octets of the host prefix, big-endian */
	__u8 cid_length;        /* server CID length, RP_QUIC_MIN_CID_LENGTH..RP_QUIC_MAX_CID_LENGTH */
	__u8 server_id_length;  /* prefix_length + worker ID length */
	__u8 prefix_length;     /* 0..RP_QUIC_MAX_PREFIX_LENGTH */
	__u8 config_rotation;   /* 0..6: the top 3 bits of every CID's first octet */
	__u32 reserved;         /* 0 */
};

/*
 * rp_config.flags: what the service uses beyond flow steering now. With none (0), the program
 * takes its shortest path: the tuple's hash, the bucket, the fallback table.
 * RP_CONFIG_CHANGING: some bucket of rp_buckets may carry RP_BUCKET_* flags (a placement change
 * runs). User space sets it before it writes the first flag and clears it only after the last
 * flag is gone, so the program, which reads the bucket flags only while it is set, never misses
 * one. RP_CONFIG_QUIC: steer UDP by QUIC connection ID first, by the layout in rp_config.quic
 * (whose `enabled` says the same to readers).
 */
#define RP_CONFIG_CHANGING 1u
#define RP_CONFIG_QUIC 2u

/*
 * rp_config: an ARRAY with one entry at key 0: everything the program needs about the service,
 * so that a packet costs one lookup of configuration whatever the service uses (QUIC or not,
 * a change or not).
 */
struct rp_config {
	__u32 abi_version;   /* RP_ABI_VERSION; 0 means "not configured": drop */
	__u32 seed;          /* key of the flow hash */
	__u32 bucket_count;  /* active entries of rp_buckets, 1..RP_MAX_BUCKETS */
	__u32 slot_count;    /* slots in use (the working generation's); for user space, the program ignores it */
	__u32 live_count;    /* slots holding a socket, spread over rp_fallback; 0: no fallback, drop */
	__u32 record_cost_ns; /* the credit a new flow record costs (1e9 / records per second); 0: no bound */
	__u32 flags;         /* RP_CONFIG_* */
	__u32 reserved;      /* 0 */
	struct rp_quic_config quic; /* QUIC connection-ID steering; quic.enabled 0: off */
};

/*
 * rp_buckets: ARRAY, key __u32 bucket, value __u32: the slot in the low 16 bits, and the
 * bucket's part in a placement change above them. In steady state the flags are 0, and
 * rp_config.flags lacks RP_CONFIG_CHANGING, so the program reads only the slot: tracking
 * costs it nothing then.
 * rp_fallback: ARRAY of RP_FALLBACK_BUCKETS, key __u32 index, value __u32 slot: the live
 * slots (those holding a socket), each on about RP_FALLBACK_BUCKETS / live_count entries.
 * User space writes it before a socket leaves the array and after one enters it.
 * rp_sockets: REUSEPORT_SOCKARRAY, key __u32 slot; user space writes a socket fd
 * (as __u64), a lookup returns the socket cookie (__u64).
 */
typedef __u32 rp_slot_t;

#define RP_BUCKET_SLOT_MASK 0xffffu
/* Learning: each UDP flow seen here is recorded in rp_flows with the slot it lands on. */
#define RP_BUCKET_LEARN (1u << 31)
/* Switched: a UDP flow with a record goes to its recorded slot; the others follow the slot. */
#define RP_BUCKET_PINNED (1u << 30)
#define RP_BUCKET_FLAGS (RP_BUCKET_LEARN | RP_BUCKET_PINNED)

static inline __u32 rp_bucket_slot(__u32 value)
{
	return value & RP_BUCKET_SLOT_MASK;
}

/*
 * rp_flows: HASH without preallocation (memory only while records exist), key struct
 * rp_flow_key, value struct rp_flow; max_entries is the service's max_tracked_flows, set
 * before load. The program creates records in RP_BUCKET_LEARN buckets and refreshes
 * last_seen_ns on every packet of a recorded flow; the daemon deletes those idle longer
 * than flow_idle_timeout, and a slot that leaves retires once no live record names it.
 * rp_untracked: same key, value __u32 (unused): flows met while rp_flows was full, each
 * counted once in rp_flow_stats.untracked.
 */
struct rp_flow_key {
	__u8 family;      /* 4 or 6 */
	__u8 protocol;    /* IPPROTO_UDP */
	__u16 reserved;   /* 0 */
	__u32 ports;      /* source_port << 16 | destination_port */
	__u32 addrs[8];   /* source then destination address as in the packet; IPv4: addrs[0..1], rest 0 */
};

struct rp_flow {
	__u32 slot;         /* where the flow went when it was recorded */
	__u32 packets;      /* packets seen since (wraps) */
	__u64 last_seen_ns; /* CLOCK_MONOTONIC of its last packet: bpf_ktime_get_ns(), or where the kernel has
			     * it (RP_CONST_COARSE_CLOCK) the coarse clock, at most a tick behind */
};

/* rp_flow_stats: PERCPU_ARRAY with one entry at key 0. */
struct rp_flow_stats {
	__u64 recorded;       /* records created */
	__u64 untracked;      /* flows not recorded because rp_flows was full, each counted once */
	__u64 untracked_uncounted; /* packets of such flows that rp_untracked had no room to count */
	__u64 rate_refused;   /* packets whose new flow was refused a record by the rate bound */
	__u64 pinned;         /* packets sent to the slot their record names */
	__u64 stale;          /* packets whose recorded slot held no socket: they followed the table */
};

/* rp_record_budget: ARRAY with one entry, shared by all CPUs: the token bucket of new records. */
struct rp_record_budget {
	__u64 credit_ns; /* accrued time, at most one second; a record costs rp_config.record_cost_ns */
	__u64 last_ns;
};

/* rp_slot_stats: PERCPU_ARRAY, key __u32 slot. Sum over CPUs in user space. */
struct rp_slot_stats {
	__u64 packets;    /* datagrams (UDP) or connection requests (TCP) steered here */
	__u64 bytes;      /* UDP payload bytes steered here; 0 for TCP */
	__u64 fallbacks;  /* of those, how many came here because their slot was empty */
};

/* rp_global_stats: PERCPU_ARRAY with one entry at key 0. */
struct rp_global_stats {
	__u64 dropped_no_slot;   /* no live slot at all (or map not configured) */
	__u64 unparsable;        /* packet the program could not parse: dropped */
	__u64 fallbacks;         /* primary slot empty, a live one was chosen */
	__u64 select_errors;     /* bpf_sk_select_reuseport failed other than ENOENT */
	__u64 migrated;          /* TCP requests of a closing listener moved to a live slot (5.14+) */
	__u64 migrate_failed;    /* ... that found no live slot: the kernel resets them */
};

_Static_assert(sizeof(struct rp_config) == 48, "rp_config layout");
_Static_assert(sizeof(struct rp_slot_stats) == 24, "rp_slot_stats layout");
_Static_assert(sizeof(struct rp_global_stats) == 48, "rp_global_stats layout");
_Static_assert(sizeof(struct rp_flow_key) == 40, "rp_flow_key layout");
_Static_assert(sizeof(struct rp_flow) == 16, "rp_flow layout");
_Static_assert(sizeof(struct rp_flow_stats) == 48, "rp_flow_stats layout");
_Static_assert(sizeof(struct rp_record_budget) == 16, "rp_record_budget layout");
_Static_assert(RP_MAX_SLOTS <= RP_BUCKET_SLOT_MASK, "a slot fits beside the bucket flags");
_Static_assert(sizeof(rp_slot_t) == 4, "slot index is a __u32");
_Static_assert((RP_MAX_BUCKETS & (RP_MAX_BUCKETS - 1)) == 0, "bucket limit is a power of two");
_Static_assert((RP_FALLBACK_BUCKETS & (RP_FALLBACK_BUCKETS - 1)) == 0, "fallback table is a power of two");
_Static_assert(RP_FALLBACK_BUCKETS >= RP_MAX_SLOTS, "every live slot gets a fallback entry");

/*
 * The flow hash: MurmurHash3 (x86_32) over 32-bit words, seeded with
 * rp_config.seed, finished with fmix32. Every input word is built in host
 * arithmetic from bytes in network order, so the result does not depend on
 * the machine's byte order:
 *   tag   = ip_version << 8 | ip_protocol     (4 or 6; IPPROTO_UDP or IPPROTO_TCP)
 *   addrs = the address bytes read big-endian, 4 at a time, source then destination
 *   ports = source_port << 16 | destination_port
 * It is not ctx->hash: that one has a random per-boot secret.
 */
static inline __u32 rp_rotl32(__u32 x, __u32 r)
{
	return (x << r) | (x >> (32 - r));
}

static inline __u32 rp_hash_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51u;
	k = rp_rotl32(k, 15);
	k *= 0x1b873593u;
	h ^= k;
	h = rp_rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

static inline __u32 rp_hash_finish(__u32 h, __u32 nwords)
{
	h ^= nwords * 4;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* A 32-bit word loaded from packet bytes (network order) as a number. */
static inline __u32 rp_be32(__u32 word)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return __builtin_bswap32(word);
#else
	return word;
#endif
}

/*
 * The flow hash of a packet. addrs holds the source then the destination address as
 * read from the packet: 2 words for IPv4, 8 for IPv6. ports = sport << 16 | dport.
 * Always inlined: with ipv6 a constant at the call, the loop unrolls to straight-line
 * code; left to itself, clang makes it a BPF-to-BPF call with a loop.
 */
static inline __attribute__((always_inline)) __u32 rp_flow_hash(__u32 seed, __u32 ip_protocol, int ipv6, const __u32 addrs[8], __u32 ports)
{
	__u32 n = ipv6 ? 8 : 2;
	__u32 h = rp_hash_mix(seed, (ipv6 ? 6 : 4) << 8 | ip_protocol);

	for (__u32 i = 0; i < n; i++)
		h = rp_hash_mix(h, rp_be32(addrs[i]));
	h = rp_hash_mix(h, ports);
	return rp_hash_finish(h, n + 2);
}

/*
 * The first rp_fallback entry a flow whose slot is empty tries. A second mix of the
 * flow hash: the flows of one bucket (one slot) spread over the whole fallback table.
 */
static inline __u32 rp_fallback_index(__u32 hash)
{
	return rp_hash_finish(hash ^ 0x9e3779b9u, 1) & (RP_FALLBACK_BUCKETS - 1);
}

/*
 * QUIC connection-ID steering in the plaintext layout of QUIC-LB
 * (draft-ietf-quic-load-balancers, "Plaintext CID Algorithm"). A server connection ID is
 *
 *   octet 0                  config rotation (top 3 bits; 0b111: "not routable") and 5 bits
 *                            of the server's choosing
 *   octets 1..sid            the server ID: host prefix (prefix_length octets, the same for
 *                            every worker of this host), then the worker ID (the rest,
 *                            RP_QUIC_MIN_WORKER_ID_LENGTH..RP_QUIC_MAX_WORKER_ID_LENGTH octets,
 *                            big-endian)
 *   octets sid+1..cid_length-1  the server's own bytes (at least RP_QUIC_MIN_NONCE_LENGTH)
 *
 * The worker ID is rp_quic_worker_id(slot): the slot in its low RP_QUIC_SLOT_BITS bits. The
 * bits above are kept for the generation (generational upgrades): today they must be 0, and a
 * CID with any of them set is not one of this configuration.
 *
 * The program reads the first RP_QUIC_HEADER_BYTES of the UDP payload (or only
 * RP_QUIC_SHORT_HEADER_BYTES of a shorter one): a short header's DCID starts at payload
 * octet 1; a long header's DCID length is octet 5 and the DCID starts at octet 6
 * (RFC 8999, RFC 9000 section 17). All of it is parsed by the static inline functions below,
 * which the program compiles and reuseportctl calls (ReuseportKit/QuicSteering.swift).
 */
#define RP_QUIC_MIN_CID_LENGTH 8
#define RP_QUIC_MAX_CID_LENGTH 20        /* RFC 9000: version 1 CIDs are at most 20 octets */
#define RP_QUIC_MIN_WORKER_ID_LENGTH 2   /* holds every slot (RP_MAX_SLOTS) */
#define RP_QUIC_MAX_WORKER_ID_LENGTH 4
#define RP_QUIC_MAX_PREFIX_LENGTH 3
#define RP_QUIC_MAX_SERVER_ID_LENGTH 7   /* prefix + worker ID: the program reads octets 1..7 */
#define RP_QUIC_MIN_NONCE_LENGTH 4       /* QUIC-LB: the server's own octets, at least 4 */
#define RP_QUIC_ROTATION_UNROUTABLE 7    /* 0b111: "this CID is not routable by a config" */
#define RP_QUIC_SLOT_BITS 10             /* log2(RP_MAX_SLOTS) */
#define RP_QUIC_NO_SLOT 0xffffffffu
/*
 * The octets the program reads, in 8-octet words: RP_QUIC_HEADER_BYTES of a long header (first
 * byte, version, DCID length, a DCID of up to 20 octets) and RP_QUIC_SHORT_HEADER_BYTES of a
 * short one (first byte, the CID's first octet, the longest server ID). No valid packet is
 * shorter: header protection samples 16 octets starting 4 after the packet number (RFC 9001,
 * 5.4.2), so a short header with an 8-octet CID has at least 29 octets, a long header with an
 * 8-octet DCID at least 36. Literals: Swift imports only those.
 */
#define RP_QUIC_HEADER_BYTES 32
#define RP_QUIC_SHORT_HEADER_BYTES 16
#define RP_QUIC_VERSION_1 0x00000001u
#define RP_QUIC_VERSION_2 0x6b3343cfu    /* RFC 9369: its Initial is long packet type 1 */

/* The layout itself, struct rp_quic_config, is rp_config.quic (above). */

/* rp_quic_stats: PERCPU_ARRAY with one entry at key 0. Sum over CPUs in user space. */
struct rp_quic_stats {
	__u64 cid_steered;         /* packets sent to the live slot their DCID names (short and long header) */
	__u64 initials;            /* long-header Initial packets (QUIC v1 and v2), however steered */
	__u64 dcid_hashed;         /* long-header packets steered by the hash of their DCID */
	__u64 unknown_cid;         /* short header, DCID not of this configuration: flow steering */
	__u64 fallbacks;           /* short header, DCID naming a slot without a socket: flow steering */
	__u64 version_negotiation; /* long header of version 0 (only servers send those): dropped */
	__u64 unparsable;          /* too short for its DCID, or a long-header DCID not of 8 to 20 octets: dropped */
	__u64 reserved;
};

/* rp_quic_slot_stats: PERCPU_ARRAY, key __u32 slot. */
struct rp_quic_slot_stats {
	__u64 cid_steered;  /* packets steered here by the server ID in their DCID */
	__u64 dcid_hashed;  /* long-header packets steered here by the hash of their DCID */
};

_Static_assert(sizeof(struct rp_quic_config) == 16, "rp_quic_config layout");
_Static_assert(sizeof(struct rp_quic_stats) == 64, "rp_quic_stats layout");
_Static_assert(sizeof(struct rp_quic_slot_stats) == 16, "rp_quic_slot_stats layout");
_Static_assert((1u << RP_QUIC_SLOT_BITS) == RP_MAX_SLOTS, "the worker ID's slot bits cover every slot");
_Static_assert(RP_QUIC_MAX_SERVER_ID_LENGTH >= RP_QUIC_MAX_PREFIX_LENGTH + RP_QUIC_MIN_WORKER_ID_LENGTH,
	       "a prefix of the longest kind leaves room for a worker ID");
_Static_assert(RP_QUIC_HEADER_BYTES >= 6 + RP_QUIC_MAX_CID_LENGTH && RP_QUIC_HEADER_BYTES % 8 == 0,
	       "a long header's DCID fits the header words");
_Static_assert(RP_QUIC_SHORT_HEADER_BYTES >= 1 + 1 + RP_QUIC_MAX_SERVER_ID_LENGTH && RP_QUIC_SHORT_HEADER_BYTES % 8 == 0,
	       "a short header's first octet, the CID's first octet and the longest server ID fit its words");
_Static_assert(RP_QUIC_SHORT_HEADER_BYTES <= 1 + RP_QUIC_MIN_CID_LENGTH + 4 + 16, "no valid short header is shorter");
_Static_assert(RP_QUIC_HEADER_BYTES <= 6 + RP_QUIC_MIN_CID_LENGTH + 2 + 4 + 16, "no valid long header is shorter");

/* What a packet is, as far as steering cares. */
enum rp_quic_kind {
	RP_QUIC_SHORT = 0,               /* DCID of cid_length octets at payload octet 1 */
	RP_QUIC_LONG = 1,                /* DCID of dcid_length octets at payload octet 6 */
	RP_QUIC_VERSION_NEGOTIATION = 2, /* long header, version 0 */
	RP_QUIC_UNPARSABLE = 3,
};

struct rp_quic_header {
	__u32 kind;         /* enum rp_quic_kind */
	__u32 initial;      /* 1: a long-header Initial (version 1 type 0, version 2 type 1) */
	__u32 dcid_length;  /* short: cid_length; long: the packet's DCID length (0..20) */
	__u32 reserved;
};

/*
 * Classifies a UDP payload of payload_length octets from its first octets, head: the first
 * RP_QUIC_HEADER_BYTES when the payload has that many, else the first
 * RP_QUIC_SHORT_HEADER_BYTES when it has those, else none; the rest of head is zero.
 * A payload shorter than those is unparsable (see above: no valid packet is), and so is a
 * long header whose DCID is shorter than any this service's servers issue or a client may
 * choose for its first Initial (RFC 9000, section 7.2), or longer than version 1 allows. A
 * short header must hold its DCID.
 */
static inline __attribute__((always_inline)) void rp_quic_parse(const struct rp_quic_config *qc,
								   const __u8 head[RP_QUIC_HEADER_BYTES],
								   __u32 payload_length, struct rp_quic_header *h)
{
	__u32 version, type;

	h->kind = RP_QUIC_UNPARSABLE;
	h->initial = 0;
	h->dcid_length = 0;
	h->reserved = 0;
	if (payload_length < RP_QUIC_SHORT_HEADER_BYTES)
		return;
	if (!(head[0] & 0x80)) {
		if (payload_length < 1u + qc->cid_length)
			return;
		h->kind = RP_QUIC_SHORT;
		h->dcid_length = qc->cid_length;
		return;
	}
	version = (__u32)head[1] << 24 | (__u32)head[2] << 16 | (__u32)head[3] << 8 | head[4];
	if (version == 0) {
		h->kind = RP_QUIC_VERSION_NEGOTIATION;
		return;
	}
	if (payload_length < RP_QUIC_HEADER_BYTES || head[5] > RP_QUIC_MAX_CID_LENGTH ||
	    head[5] < RP_QUIC_MIN_CID_LENGTH)
		return;
	type = (head[0] >> 4) & 3;
	h->kind = RP_QUIC_LONG;
	h->dcid_length = head[5];
	h->initial = (version == RP_QUIC_VERSION_1 && type == 0) || (version == RP_QUIC_VERSION_2 && type == 1);
}

/* The worker ID a slot's workers put in their server ID. */
static inline __u32 rp_quic_worker_id(__u32 slot)
{
	return slot;
}

/*
 * The slot a server CID names, or RP_QUIC_NO_SLOT when it is not a CID of this configuration
 * (config rotation, host prefix, or reserved generation bits). cid holds at least
 * 1 + RP_QUIC_MAX_SERVER_ID_LENGTH octets (octets past the CID's end are never part of the
 * server ID: the configuration keeps server_id_length + 1 + RP_QUIC_MIN_NONCE_LENGTH <= cid_length).
 * No loop over a variable count: shifts of a 56-bit window.
 */
static inline __attribute__((always_inline)) __u32 rp_quic_server_slot(const struct rp_quic_config *qc, const __u8 *cid)
{
	__u64 window = 0, worker;
	__u32 worker_bits;

	if ((cid[0] >> 5) != qc->config_rotation || qc->server_id_length > RP_QUIC_MAX_SERVER_ID_LENGTH ||
	    qc->prefix_length > RP_QUIC_MAX_PREFIX_LENGTH || qc->server_id_length < qc->prefix_length + 1u)
		return RP_QUIC_NO_SLOT;
	for (int i = 1; i <= RP_QUIC_MAX_SERVER_ID_LENGTH; i++)
		window = window << 8 | cid[i];
	window >>= 8 * (RP_QUIC_MAX_SERVER_ID_LENGTH - qc->server_id_length);
	worker_bits = 8 * (qc->server_id_length - qc->prefix_length);
	if ((window >> worker_bits) != qc->host_prefix)
		return RP_QUIC_NO_SLOT;
	worker = window & ((1ull << worker_bits) - 1);
	if (worker >= RP_MAX_SLOTS)
		return RP_QUIC_NO_SLOT;
	return (__u32)worker;
}

/*
 * The hash a long-header packet is steered by: its DCID (the client's choice on a first
 * Initial and 0-RTT, kept until the server's first packet), keyed by rp_config.seed, so every
 * packet of one handshake reaches one worker whatever address it comes from. Only the first
 * RP_QUIC_MIN_CID_LENGTH octets count (with the length): a client's first DCID has at least
 * that many random octets (RFC 9000, section 7.2), and a fixed count keeps the program free of
 * per-octet branches, each of which would multiply the states the verifier walks.
 */
static inline __u32 rp_quic_dcid_hash(__u32 seed, const __u8 dcid[RP_QUIC_MIN_CID_LENGTH], __u32 length)
{
	__u32 h = rp_hash_mix(seed, 0x51u << 8 | length);

	h = rp_hash_mix(h, (__u32)dcid[0] << 24 | (__u32)dcid[1] << 16 | (__u32)dcid[2] << 8 | dcid[3]);
	h = rp_hash_mix(h, (__u32)dcid[4] << 24 | (__u32)dcid[5] << 16 | (__u32)dcid[6] << 8 | dcid[7]);
	return rp_hash_finish(h, 3);
}

#endif /* REUSEPORT_DISPATCH_H */
