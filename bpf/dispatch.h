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
 */
#define RP_ABI_VERSION 3

/* Limits. Map sizes are fixed at load time. */
#define RP_MAX_SLOTS 1024     /* sockets (= workers) per listener */
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

/* Map names as libbpf sees them in the object (and the file names of the pins). */
#define RP_MAP_CONFIG "rp_config"
#define RP_MAP_BUCKETS "rp_buckets"
#define RP_MAP_SOCKETS "rp_sockets"
#define RP_MAP_SLOT_STATS "rp_slot_stats"
#define RP_MAP_GLOBAL_STATS "rp_global_stats"
#define RP_MAP_SLOT_STATE "rp_slot_state"
#define RP_MAP_FALLBACK "rp_fallback"
#define RP_PROG_DISPATCH "rp_dispatch"

/* rp_config: an ARRAY with one entry at key 0. */
struct rp_config {
	__u32 abi_version;   /* RP_ABI_VERSION; 0 means "not configured": drop */
	__u32 seed;          /* key of the flow hash */
	__u32 bucket_count;  /* active entries of rp_buckets, 1..RP_MAX_BUCKETS */
	__u32 slot_count;    /* slots in use (0..slot_count-1); for user space, the program ignores it */
	__u32 live_count;    /* slots holding a socket, spread over rp_fallback; 0: no fallback, drop */
	__u32 reserved;      /* 0 */
};

/*
 * rp_buckets: ARRAY, key __u32 bucket, value __u32 slot.
 * rp_fallback: ARRAY of RP_FALLBACK_BUCKETS, key __u32 index, value __u32 slot: the live
 * slots (those holding a socket), each on about RP_FALLBACK_BUCKETS / live_count entries.
 * User space writes it before a socket leaves the array and after one enters it.
 * rp_sockets: REUSEPORT_SOCKARRAY, key __u32 slot; user space writes a socket fd
 * (as __u64), a lookup returns the socket cookie (__u64).
 */
typedef __u32 rp_slot_t;

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
};

/*
 * Worker state, as the daemon reports it (rp_slot_state). New values are added at the
 * end. RP_WORKER_STALLED: the worker is alive but its socket's receive queue stays full
 * while the kernel drops datagrams at it (it closed the socket or stopped reading); the
 * daemon samples sock_diag every second and goes back to RUNNING when the queue drains.
 */
enum rp_worker_state {
	RP_WORKER_EMPTY = 0,     /* slot unused */
	RP_WORKER_STARTING = 1,  /* spawned, not yet seen healthy */
	RP_WORKER_RUNNING = 2,
	RP_WORKER_BACKOFF = 3,   /* exited, waiting before the next start */
	RP_WORKER_FAILED_OVER = 4, /* down too long: buckets point at live slots */
	RP_WORKER_STOPPING = 5,
	RP_WORKER_STALLED = 6,   /* running, but its receive queue stays full and drops grow */
};

/*
 * rp_slot_state: ARRAY, key __u32 slot. Written only by the daemon; the BPF
 * program never reads it. It lives in the object so that it is pinned beside
 * the other maps and reuseportctl can read it while the daemon is wedged.
 */
struct rp_slot_state {
	__u32 pid;           /* worker pid, 0 if none */
	__u32 state;         /* enum rp_worker_state */
	__u32 restarts;      /* worker starts after the first */
	__u32 generation;    /* reserved for generational upgrades, 0 today */
	__u64 since_ns;      /* CLOCK_REALTIME of the last state change */
	__u64 socket_cookie; /* cookie of the slot's socket in the first listener */
	__u32 stalls;        /* times the slot was marked RP_WORKER_STALLED */
	__u32 watchdog_restarts; /* workers stopped for missing their watchdog (WATCHDOG=1) */
};

_Static_assert(sizeof(struct rp_config) == 24, "rp_config layout");
_Static_assert(sizeof(struct rp_slot_stats) == 24, "rp_slot_stats layout");
_Static_assert(sizeof(struct rp_global_stats) == 32, "rp_global_stats layout");
_Static_assert(sizeof(struct rp_slot_state) == 40, "rp_slot_state layout");
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

#endif /* REUSEPORT_DISPATCH_H */
