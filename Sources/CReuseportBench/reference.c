// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// rp_config as the reference program (.output/reference: bpf/ at BENCH_REFERENCE, from git) reads
// it, built from that revision's own header: the bench never restates an old layout. This file
// alone includes it, so its struct names meet no others.
#include "CReuseportBench.h"

#include <string.h>

#if __has_include("../../.output/reference/revision.h") && __has_include("../../.output/reference/dispatch.h")
#include "../../.output/reference/revision.h"
#include "../../.output/reference/dispatch.h"

const char *rp_bench_reference_revision(void)
{
	return RP_BENCH_REFERENCE;
}

size_t rp_bench_reference_config(unsigned char *out, size_t capacity, uint32_t seed, uint32_t bucket_count,
				 uint32_t slot_count)
{
	struct rp_config config;

	if (capacity < sizeof(config))
		return 0;
	memset(&config, 0, sizeof(config));
	config.abi_version = RP_ABI_VERSION;
	config.seed = seed;
	config.bucket_count = bucket_count;
	config.slot_count = slot_count;
#if RP_ABI_VERSION >= 2
	/* From ABI 2 an empty slot falls back through rp_fallback, which the bench leaves empty. */
	config.live_count = slot_count;
#endif
	memcpy(out, &config, sizeof(config));
	return sizeof(config);
}
#else
const char *rp_bench_reference_revision(void)
{
	return "";
}

size_t rp_bench_reference_config(unsigned char *out, size_t capacity, uint32_t seed, uint32_t bucket_count,
				 uint32_t slot_count)
{
	(void)out, (void)capacity, (void)seed, (void)bucket_count, (void)slot_count;
	return 0;
}
#endif
