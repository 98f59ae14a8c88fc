/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * too_large.h - a program built only for the tests: one the verifier must refuse as too
 * large on every kernel, so that the tests can see what a refused load reports.
 */
#ifndef REUSEPORT_TOO_LARGE_H
#define REUSEPORT_TOO_LARGE_H

#define RP_PROG_TEST_TOO_LARGE "rp_test_too_large"
/* Iterations of its loop: with 3 or more instructions each, past the verifier's 1M. */
#define RP_TEST_TOO_LARGE_ITERATIONS (1 << 20)

#endif /* REUSEPORT_TOO_LARGE_H */
