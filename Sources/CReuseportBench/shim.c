// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// Declarations only (include/CReuseportBench.h); SwiftPM needs one source file per C target.
#include "CReuseportBench.h"
