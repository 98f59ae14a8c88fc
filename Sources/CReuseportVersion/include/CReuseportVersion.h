// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// The version of this build, for both binaries (ReuseportControl's BuildVersion).
#ifndef CREUSEPORT_VERSION_H
#define CREUSEPORT_VERSION_H

/* `make` writes .output/version.h with the package's version (the Makefile's DEB_VERSION: the
 * git commit, and -dirty when the tree has changes); a build without make says so. */
const char *rp_version(void);

#endif
