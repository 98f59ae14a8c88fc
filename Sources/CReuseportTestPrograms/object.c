// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CReuseportTestPrograms.h"

// Built by `make` (the Makefile's .output/%.bpf.o rule).
#if !__has_embed("../../.output/too_large.bpf.o")
#error "the BPF object .output/too_large.bpf.o is missing: run `make` (it builds the objects, then the Swift package)"
#endif
static const unsigned char too_large_object[] = {
#embed "../../.output/too_large.bpf.o"
};

const unsigned char *rp_test_too_large_object(void)
{
	return too_large_object;
}

size_t rp_test_too_large_object_size(void)
{
	return sizeof(too_large_object);
}
