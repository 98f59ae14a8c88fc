/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * records.h - what the daemon pins for a later daemon that the BPF program never reads.
 *
 * Versioned apart from the program's ABI (dispatch.h, RP_ABI_VERSION): a change here does not
 * change the program, and a change of the program does not give up these records. The daemon
 * creates these maps itself (bpf_map_create: the same capabilities as loading the program) and
 * pins them beside the program's maps, under the same file names as when they were the
 * object's, so readers of the pins see no difference.
 *
 * Records version, stored in rp_records_version: a daemon that finds another refuses to adopt
 * (a newer one, or one it cannot migrate) and says which versions met, or migrates them (an
 * older one it knows: ReuseportKit/ServiceRecords.swift).
 * 1: rp_leaving. rp_slot_state, rp_transition and rp_next_buckets were the object's maps (ABI 8)
 *    and had the layouts of version 2; no rp_records_version map.
 * 2: rp_slot_state, rp_transition and rp_next_buckets are records, created by the daemon;
 *    rp_records_version. Migrating from 1 rewrites nothing: the layouts are the same.
 * 3: rp_canary and rp_canary_buckets, a canary's bake and buckets. Migrating from 2 (or 1)
 *    rewrites nothing: those maps are new, and pins without them had no canary recorded (a
 *    daemon of version 2 kept its canary in memory only: its successor did not resume it).
 */
#ifndef REUSEPORTD_RECORDS_H
#define REUSEPORTD_RECORDS_H

#include <linux/types.h>

#define RP_RECORDS_VERSION 3

/*
 * rp_records_version: ARRAY with one entry, value __u32: the RP_RECORDS_VERSION of the daemon
 * that pinned the records. A map of its own, not a field of rp_transition: its layout never
 * changes, so every daemon can read it before it knows the layout of anything else (a field
 * of rp_transition would be unreadable just when rp_transition's size changed, the case it is
 * there for). No such map pinned: version 1.
 */
#define RP_MAP_RECORDS_VERSION "rp_records_version"

/*
 * rp_transition: ARRAY with one entry: the placement change in progress, so that a daemon
 * started again finishes it, and the generation numbers.
 * rp_next_buckets: ARRAY like rp_buckets (as many entries as the service's bucket count),
 * value __u32 slot: while learning, the table the switch will write (without flags).
 */
#define RP_MAP_TRANSITION "rp_transition"
#define RP_MAP_NEXT_BUCKETS "rp_next_buckets"

enum rp_transition_phase {
	RP_TRANSITION_NONE = 0,
	RP_TRANSITION_LEARNING = 1,  /* recording the flows of the buckets that will move */
	RP_TRANSITION_DRAINING = 2,  /* switched; recorded flows keep their slot until idle */
};

struct rp_transition {
	__u32 phase;            /* enum rp_transition_phase */
	__u32 slots_after;      /* slot count after the switch */
	__u32 socket_slots;     /* every slot holding a socket is below it (leaving ones included);
				 * kept with or without a change: a later daemon adopts the workers of
				 * the slots below it, which after an upgrade need not be 0..slot_count */
	__u32 moving_buckets;   /* buckets whose slot changes at the switch */
	__u64 started_ns;       /* CLOCK_MONOTONIC */
	__u64 switch_ns;        /* learning ends (CLOCK_MONOTONIC) */
	__u64 drain_deadline_ns; /* leaving slots retire by then, records or not; 0 before the switch */
	__u64 idle_timeout_ns;  /* flow_idle_timeout of the change */
	/*
	 * Generations (sets of slots running one worker definition): the one taking new flows, and
	 * the last number given out. Kept here, phase or not, so that a daemon started again never
	 * gives a number out twice (a worker may encode its generation in connection IDs).
	 */
	__u32 working_generation;
	__u32 last_generation;
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

/* rp_slot_state.flags */
#define RP_SLOT_LEAVING 1u   /* a scale-down removes the slot: it takes no new flow and retires once drained */
#define RP_SLOT_JOINING 2u   /* a scale-up added the slot: it takes flows from the switch on */
#define RP_SLOT_IN_SET 4u    /* one of the service's slots now (rp_config.slot_count of them): the set a
			      * daemon started on the pins resumes, whatever their indices (the program
			      * never reads flags: a new bit changes no layout and no RP_RECORDS_VERSION) */
#define RP_SLOT_IN_NEXT_SET 8u /* one of the slots the pending change switches to: the target a daemon
				* started on the pins resumes (rp_next_buckets alone does not name a
				* failed-over slot) */

/*
 * rp_slot_state: ARRAY of RP_MAX_SLOTS (dispatch.h), key __u32 slot. Pinned beside the
 * program's maps, so that reuseportctl can read it while the daemon is wedged.
 */
#define RP_MAP_SLOT_STATE "rp_slot_state"
struct rp_slot_state {
	__u32 pid;           /* worker pid, 0 if none */
	__u32 state;         /* enum rp_worker_state */
	__u32 restarts;      /* worker starts after the first */
	__u32 generation;    /* the generation of the slot's worker definition (rp_transition) */
	__u64 since_ns;      /* CLOCK_REALTIME of the last state change */
	__u64 socket_cookie; /* cookie of the slot's socket in the first listener */
	__u32 stalls;        /* times the slot was marked RP_WORKER_STALLED */
	__u32 watchdog_restarts; /* workers stopped for missing their watchdog (WATCHDOG=1) */
	__u32 records;       /* live flow records naming the slot, at the daemon's last sweep */
	__u32 flags;         /* RP_SLOT_* */
	__u64 start_time;    /* the worker's start time, in clock ticks after boot (proc(5),
			      * /proc/<pid>/stat field 22): with pid, it names one process, so a
			      * daemon started later never adopts a process that reused the pid */
};

_Static_assert(sizeof(struct rp_slot_state) == 56, "rp_slot_state layout");
_Static_assert(sizeof(struct rp_transition) == 56, "rp_transition layout");

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

/*
 * rp_canary: ARRAY with one entry: the canary of the service's upgrade while it learns or bakes,
 * so that a daemon started on the pins (after a kill, or its own exec) resumes it instead of
 * dropping it. phase RP_CANARY_NONE: no canary. The daemon writes it at each step of the canary
 * and at each check of the bake (once a second), from its bake and the placement's canary.
 *
 * rp_canary_buckets: ARRAY like rp_buckets (as many entries as the service's bucket count),
 * value __u32: the slot a canary bucket named before the canary (where a rollback sends it back
 * and the table promotion rebalances from), RP_CANARY_NOT_A_BUCKET for every other bucket.
 * Which buckets are the canary's is not in rp_buckets while they learn, and the slot they
 * named before never is once they switched.
 */
#define RP_MAP_CANARY "rp_canary"
#define RP_MAP_CANARY_BUCKETS "rp_canary_buckets"
#define RP_CANARY_NOT_A_BUCKET 0xffffffffu

enum rp_canary_phase {
	RP_CANARY_NONE = 0,
	RP_CANARY_LEARNING = 1,	/* its buckets learn their live flows; the bake has not begun */
	RP_CANARY_BAKING = 2,	/* its buckets switched; the bake ends at bake_ends_ns */
	RP_CANARY_GATE = 3,	/* the bake passed and the gate ran (a later daemon runs it again) */
};

/* rp_canary.flags */
#define RP_CANARY_GATED 1u	/* a gate decides at the end of the bake */

/*
 * What a bake counted for one generation until the daemon's last check (GenerationEvents):
 * counters of processes (exits) and of the daemon's own checks (health failures) that a later
 * daemon cannot read back from the kernel, and the kernel's packets and drops of the
 * generation's slots since the bake began.
 */
struct rp_bake_events {
	__u32 quick_exits;
	__u32 crashes;
	__u32 watchdog_misses;
	__u32 stalls;
	__u32 health_failures;
	__u32 pad;
	__u64 packets;
	__u64 drops;
};

struct rp_canary {
	__u32 phase;		/* enum rp_canary_phase */
	__u32 generation;	/* the canary's */
	__u32 previous;		/* the working generation it is compared with */
	__u32 percent;		/* of the buckets */
	__u32 buckets;		/* the canary's buckets (rp_canary_buckets names them) */
	__u32 flags;		/* RP_CANARY_* */
	__u64 bake_ms;
	__u64 bake_ends_ns;	/* CLOCK_MONOTONIC (one clock for every process of a boot, never set
				 * back; the pins do not outlive a boot); 0 before the bake began */
	__u64 bake_ends_wall_ns; /* CLOCK_REALTIME, for reuseportctl */
	struct rp_bake_events counted[2]; /* [0] the canary, [1] the working generation */
};

_Static_assert(sizeof(struct rp_bake_events) == 40, "rp_bake_events layout");
_Static_assert(sizeof(struct rp_canary) == 128, "rp_canary layout");

#endif
