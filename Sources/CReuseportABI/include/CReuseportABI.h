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

/* dispatch.bpf.o, compiled by `make` and embedded by object.c. */
const unsigned char *rp_dispatch_object(void);
size_t rp_dispatch_object_size(void);

/* baseline.bpf.o: the reference programs the benchmarks measure rp_dispatch against. */
const unsigned char *rp_baseline_object(void);
size_t rp_baseline_object_size(void);

#endif
