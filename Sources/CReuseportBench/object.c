// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CReuseportBench.h"

// Built by `make` (the Makefile's dispatch_untracked rule): rp_dispatch without flow tracking.
#if !__has_embed("../../.output/dispatch_untracked.bpf.o")
#error "the BPF object .output/dispatch_untracked.bpf.o is missing: run `make` (it builds the objects, then the Swift package)"
#endif
static const unsigned char untracked_object[] = {
#embed "../../.output/dispatch_untracked.bpf.o"
};

const unsigned char *rp_bench_untracked_object(void)
{
	return untracked_object;
}

size_t rp_bench_untracked_object_size(void)
{
	return sizeof(untracked_object);
}

// Built by `make` (the Makefile's BENCH_BUILDS): rp_dispatch without a record's refresh.
#if !__has_embed("../../.output/dispatch_norefresh.bpf.o")
#error "the BPF object .output/dispatch_norefresh.bpf.o is missing: run `make` (it builds the objects, then the Swift package)"
#endif
static const unsigned char norefresh_object[] = {
#embed "../../.output/dispatch_norefresh.bpf.o"
};

const unsigned char *rp_bench_norefresh_object(void)
{
	return norefresh_object;
}

size_t rp_bench_norefresh_object_size(void)
{
	return sizeof(norefresh_object);
}

// Built by `make` (the Makefile's FLOW_KEY_BUILDS): bpf/flow_key_cost.bpf.c with the 40-octet key
// rp_flows has (shared) and with the 16-octet IPv4 key (ipv4). #embed names a missing object itself.
const unsigned char *rp_bench_flow_key_object(int ipv4, size_t *size)
{
	static const unsigned char shared[] = {
#embed "../../.output/flow_key_shared.bpf.o"
	};
	static const unsigned char ipv4_key[] = {
#embed "../../.output/flow_key_ipv4.bpf.o"
	};

	*size = ipv4 ? sizeof(ipv4_key) : sizeof(shared);
	return ipv4 ? ipv4_key : shared;
}

// Built by `make` from git (the Makefile's dispatch_reference rule): rp_dispatch at another revision,
// BENCH_REFERENCE. Empty when git could not provide it: the bench then runs without it.
#if __has_embed("../../.output/dispatch_reference.bpf.o") == __STDC_EMBED_FOUND__
static const unsigned char reference_object[] = {
#embed "../../.output/dispatch_reference.bpf.o"
};

const unsigned char *rp_bench_reference_object(void)
{
	return reference_object;
}

size_t rp_bench_reference_object_size(void)
{
	return sizeof(reference_object);
}
#else
const unsigned char *rp_bench_reference_object(void)
{
	return NULL;
}

size_t rp_bench_reference_object_size(void)
{
	return 0;
}
#endif
