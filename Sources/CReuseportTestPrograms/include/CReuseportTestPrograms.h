// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// BPF objects built only for the tests and kernel-check, never linked into reuseportd.
#ifndef CREUSEPORT_TEST_PROGRAMS_H
#define CREUSEPORT_TEST_PROGRAMS_H

#include <stddef.h>
#include "../../../bpf/too_large.h"

/* too_large.bpf.o: a program every verifier must refuse as too large. */
const unsigned char *rp_test_too_large_object(void);
size_t rp_test_too_large_object_size(void);

#endif
