// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CReuseportABI.h"

// Built by `make` (see the Makefile, targets .output/*.bpf.o).
#if !__has_embed("../../.output/dispatch.bpf.o")
#error "the BPF object .output/dispatch.bpf.o is missing: run `make` (it builds the object, then the Swift package)"
#endif
#if !__has_embed("../../.output/baseline.bpf.o")
#error "the BPF object .output/baseline.bpf.o is missing: run `make` (it builds the objects, then the Swift package)"
#endif
static const unsigned char object[] = {
#embed "../../.output/dispatch.bpf.o"
};

static const unsigned char baseline_object[] = {
#embed "../../.output/baseline.bpf.o"
};

const unsigned char *rp_dispatch_object(void)
{
	return object;
}

size_t rp_dispatch_object_size(void)
{
	return sizeof(object);
}

const unsigned char *rp_baseline_object(void)
{
	return baseline_object;
}

size_t rp_baseline_object_size(void)
{
	return sizeof(baseline_object);
}
