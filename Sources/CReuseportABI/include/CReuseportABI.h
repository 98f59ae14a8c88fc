// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The C side of ReuseportKit: the ABI header, the embedded BPF object, and the few
// kernel constants and macros Swift cannot import. Every symbol is prefixed rp_.
#ifndef CDISPATCH_H
#define CDISPATCH_H

#include <stddef.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include "../../../bpf/dispatch.h"
#include "../../../bpf/baseline.h"

/* dispatch.bpf.o, compiled by `make` and embedded by object.c. */
const unsigned char *rp_dispatch_object(void);
size_t rp_dispatch_object_size(void);

/* baseline.bpf.o: the reference programs the benchmarks measure rp_dispatch against. */
const unsigned char *rp_baseline_object(void);
size_t rp_baseline_object_size(void);

/* <asm-generic/socket.h> values that glibc's headers may not define. */
static const int rp_SO_ATTACH_REUSEPORT_EBPF = 52;
static const int rp_SO_DETACH_REUSEPORT_BPF = 68;
static const int rp_SO_COOKIE = 57;
static const unsigned long rp_BPF_FS_MAGIC = 0xcafe4a11;

#endif
