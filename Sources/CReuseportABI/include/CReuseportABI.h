// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The C side of ReuseportKit: the ABI header and the embedded BPF objects. Kernel
// constants come from the system's headers (SO_COOKIE, SO_ATTACH_REUSEPORT_EBPF and
// SO_DETACH_REUSEPORT_BPF from <asm-generic/socket.h> through <sys/socket.h>), never
// typed again here. Every symbol of our own is prefixed rp_.
#ifndef CREUSEPORT_ABI_H
#define CREUSEPORT_ABI_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <linux/magic.h> /* BPF_FS_MAGIC */
#include "../../../bpf/dispatch.h"
#include "../../../bpf/baseline.h"
#include "../../../bpf/flow_key_cost.h"
#include "../../../bpf/records.h"
#include <linux/bpf.h>

/*
 * The probe of BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (ReuseportMigration.swift): an SK_REUSEPORT
 * program that reads ctx->migrating_sk and returns SK_PASS. Kernels before 5.14 accept the
 * attach type for this program type without knowing it, but their verifier refuses the
 * field, so the read is what tells. Fills 3 instructions.
 */
static inline void rp_migrate_probe_instructions(struct bpf_insn insns[3])
{
	insns[0] = (struct bpf_insn){ .code = BPF_LDX | BPF_MEM | BPF_DW, .dst_reg = BPF_REG_0, .src_reg = BPF_REG_1,
				      .off = offsetof(struct sk_reuseport_md, migrating_sk) };
	insns[1] = (struct bpf_insn){ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = SK_PASS };
	insns[2] = (struct bpf_insn){ .code = BPF_JMP | BPF_EXIT };
}

/* dispatch.bpf.o, compiled by `make` and embedded by object.c. */
const unsigned char *rp_dispatch_object(void);
size_t rp_dispatch_object_size(void);

/* baseline.bpf.o: the reference programs the benchmarks measure rp_dispatch against. */
const unsigned char *rp_baseline_object(void);
size_t rp_baseline_object_size(void);

#endif
