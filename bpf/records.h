/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * records.h - what the daemon pins for a later daemon that the BPF program never reads.
 *
 * Versioned apart from the program's ABI (dispatch.h, RP_ABI_VERSION): a change here does not
 * change the program, and a change of the program does not give up these records. A daemon
 * that finds records of another version (the map's value size differs) does not read them,
 * says so, and replaces them.
 */
#ifndef REUSEPORTD_RECORDS_H
#define REUSEPORTD_RECORDS_H

#include <linux/types.h>

#define RP_RECORDS_VERSION 1

/*
 * rp_leaving (BPF_MAP_TYPE_HASH, BPF_F_NO_PREALLOC, key: __u32 pid): the workers that left
 * their slot and still run (draining, holding their TCP connections, stopping). Rows of
 * rp_slot_state describe slots; a slot index may be taken again while its old worker still
 * runs, so these workers are kept by pid. A daemon started on the pins (after a kill, or its
 * own exec) takes them over, proving each by its start time as it proves slot workers.
 */
#define RP_MAP_LEAVING "rp_leaving"
#define RP_MAX_LEAVING 4096

enum rp_leaving_state {
	RP_LEAVING_DRAINING = 1, /* reads what was queued at its slot's sockets */
	RP_LEAVING_HOLDING = 2,  /* keeps its accepted TCP connections until hold_until_ns */
	RP_LEAVING_STOPPING = 3, /* SIGTERM sent; SIGKILL at stop_timeout_ms */
};

struct rp_leaving_worker {
	__u32 slot;          /* the slot it left */
	__u32 generation;    /* the generation of its worker definition */
	__u64 start_time;    /* clock ticks after boot (/proc/<pid>/stat field 22) */
	__u64 hold_until_ns; /* CLOCK_MONOTONIC; 0: no hold */
	__u32 state;         /* enum rp_leaving_state */
	__u32 version;       /* RP_RECORDS_VERSION */
};

_Static_assert(sizeof(struct rp_leaving_worker) == 32, "rp_leaving_worker layout");

#endif
