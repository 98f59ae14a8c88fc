/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * flow_key_cost.h - names shared by bpf/flow_key_cost.bpf.c and the benchmark suite.
 *
 * Not part of the data plane, nor of its ABI: the program exists only so that bench item 7
 * can say what a flow key sized per family would save, per pinned IPv4 packet and per record
 * (docs/benchmarks.md), before anyone changes struct rp_flow_key.
 */
#ifndef REUSEPORT_FLOW_KEY_COST_H
#define REUSEPORT_FLOW_KEY_COST_H

#include <linux/types.h>

/* rp_dispatch's pinned path alone: key from the packet, record lookup, refresh, select. */
#define RP_PROG_KEY_COST "rp_key_cost_pinned"
/* HASH without preallocation, as rp_flows; its key is the build's, its value struct rp_flow. */
#define RP_MAP_KEY_COST_FLOWS "rp_key_cost_flows"
/* REUSEPORT_SOCKARRAY: user space makes it the listener's own rp_sockets (a socket is in one array only). */
#define RP_MAP_KEY_COST_SOCKETS "rp_key_cost_sockets"
/* PERCPU_ARRAY with one struct rp_key_cost_stats at key 0. */
#define RP_MAP_KEY_COST_STATS "rp_key_cost_stats"

/*
 * An IPv4 flow's key sized for its family: the first 16 octets of struct rp_flow_key (family,
 * protocol, reserved, ports, source and destination address), so that user space writes it by
 * taking that prefix of a record's key.
 */
struct rp_flow_key_ipv4 {
	__u8 family;    /* 4 */
	__u8 protocol;  /* IPPROTO_UDP */
	__u16 reserved; /* 0 */
	__u32 ports;    /* source_port << 16 | destination_port */
	__u32 addrs[2]; /* source then destination address as in the packet */
};

struct rp_key_cost_stats {
	__u64 pinned; /* packets sent to the slot their record names */
	__u64 missed; /* packets without a record (or not IPv4 UDP, or their slot empty): dropped */
};

_Static_assert(sizeof(struct rp_flow_key_ipv4) == 16, "rp_flow_key_ipv4 layout");
_Static_assert(sizeof(struct rp_key_cost_stats) == 16, "rp_key_cost_stats layout");

#endif /* REUSEPORT_FLOW_KEY_COST_H */
