// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CReuseportABI.h"

// Built by `make` (see the Makefile, target .output/dispatch.bpf.o). Building the Swift
// package without make fails here: run `make` once first.
static const unsigned char object[] = {
#embed "../../.output/dispatch.bpf.o"
};

const unsigned char *rp_dispatch_object(void)
{
	return object;
}

size_t rp_dispatch_object_size(void)
{
	return sizeof(object);
}
