// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Prints flow-hash test vectors from the hash in dispatch.h (the code the BPF program
 * compiles), for the Swift implementation to be checked against:
 *   make vectors   (writes bpf/testdata/flow-hash-vectors.txt)
 * Line format: seed proto source destination hash bucket/4096 fallback-index
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include "../dispatch.h"

struct vector {
	const char *proto, *src, *dst;
	unsigned sport, dport, seed;
};

static const struct vector vectors[] = {
	{ "udp", "127.0.0.1", "127.0.0.1", 40000, 5300, 0 },
	{ "udp", "127.0.0.1", "127.0.0.1", 40001, 5300, 0 },
	{ "udp", "127.0.0.1", "127.0.0.1", 40000, 5300, 1 },
	{ "tcp", "127.0.0.1", "127.0.0.1", 40000, 5300, 0 },
	{ "udp", "10.1.2.3", "192.0.2.10", 53, 53, 0xdeadbeef },
	{ "udp", "255.255.255.255", "0.0.0.0", 65535, 0, 0xffffffff },
	{ "tcp", "198.51.100.7", "203.0.113.1", 1, 443, 42 },
	{ "udp", "::1", "::1", 40000, 5300, 0 },
	{ "tcp", "::1", "::1", 40000, 5300, 0 },
	{ "udp", "2001:db8::1", "2001:db8::2", 51820, 51820, 0x12345678 },
	{ "udp", "fe80::1:2:3:4", "ff02::fb", 5353, 5353, 7 },
	{ "tcp", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "::", 12345, 80, 0x9e3779b9 },
};

int main(void)
{
	for (unsigned i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		const struct vector *v = &vectors[i];
		/* As the program loads them: source then destination, network order. */
		__u32 addrs[8] = { 0 };
		int v4 = inet_pton(AF_INET, v->src, addrs) == 1;
		int len = v4 ? 4 : 16;
		__u32 proto = strcmp(v->proto, "udp") == 0 ? 17 : 6;
		__u32 h;

		if (!v4)
			inet_pton(AF_INET6, v->src, addrs);
		inet_pton(v4 ? AF_INET : AF_INET6, v->dst, (unsigned char *)addrs + len);
		h = rp_flow_hash(v->seed, proto, !v4, addrs, v->sport << 16 | v->dport);
		printf("0x%08x %s %s%s%s:%u %s%s%s:%u 0x%08x %u %u\n", v->seed, v->proto,
		       v4 ? "" : "[", v->src, v4 ? "" : "]", v->sport,
		       v4 ? "" : "[", v->dst, v4 ? "" : "]", v->dport, h, h % 4096,
		       rp_fallback_index(h));
	}
	return 0;
}
