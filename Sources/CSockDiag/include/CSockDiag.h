// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
// Kernel uapi that Swift cannot import from Glibc: sock_diag over netlink (per-socket receive
// queues and drops, matched by socket cookie: ReuseportKit/SocketDiagnostics.swift, used by
// reuseportctl and the daemon) and capability numbers (reuseportctl features).
// Every symbol is prefixed rp_.
#ifndef CSOCKDIAG_H
#define CSOCKDIAG_H

#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>
#include <linux/capability.h>

/* One inet_diag dump request, as sent: header and body back to back (netlink(7)). */
struct rp_diag_request {
	struct nlmsghdr header;
	struct inet_diag_req_v2 body;
};

/* NLMSG_ALIGN() and NLA_ALIGN() are macros Swift cannot call. */
unsigned int rp_nlmsg_align(unsigned int length);
unsigned int rp_nla_align(unsigned int length);

#endif
