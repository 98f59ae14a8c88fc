// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
#include "CSockDiag.h"

unsigned int rp_nlmsg_align(unsigned int length)
{
	return NLMSG_ALIGN(length);
}

unsigned int rp_nla_align(unsigned int length)
{
	return NLA_ALIGN(length);
}
