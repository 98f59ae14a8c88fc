// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CReuseportVersion.h"

// Written by `make` (target `version` of the Makefile), which touches this file when the
// version changes so that SwiftPM compiles it again. A plain `swift build` has none.
#if __has_include("../../.output/version.h")
#include "../../.output/version.h"
#endif
#ifndef RP_VERSION
#define RP_VERSION "unknown (built without make)"
#endif

const char *rp_version(void)
{
	return RP_VERSION;
}
