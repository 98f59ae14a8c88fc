// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * bind_preload.c - LD_PRELOAD library that gives a server which binds its own socket the
 * slot's socket instead (`preload_bind = true`, docs/configuration.md, "Running a server
 * without socket activation").
 *
 * The daemon passes a worker its slot's sockets as systemd does (fd 3 on, LISTEN_FDS,
 * LISTEN_PID). A server that knows nothing of that calls socket(), setsockopt(), bind() and,
 * for TCP, listen() itself. Its bind() would make a new socket in the port's reuseport group
 * that the steering program never selects (it is in no slot), or fail with EADDRINUSE. Here
 * bind() of exactly the address, type and protocol of an inherited socket instead dup3()s that
 * socket onto the server's descriptor, so the server serves the slot's socket, which outlives
 * it, with no change to the server.
 *
 *   bind()        an inherited socket of the same domain, type and protocol whose
 *                 getsockname() equals the address (port and address, wildcard or not) is
 *                 dup3()ed onto the server's fd: its fd flags (FD_CLOEXEC) and O_NONBLOCK stay
 *                 as the server set them, and the options the server set on its own socket
 *                 before bind() are set again on the inherited one. Any other bind() is the
 *                 kernel's.
 *   setsockopt()  SO_REUSEADDR and SO_REUSEPORT on an inherited socket succeed without
 *                 touching it: the daemon set them, and clearing SO_REUSEPORT must not be up to
 *                 the server. Other options go through.
 *   listen()      not wrapped: listen() on a socket that listens already only sets its backlog
 *                 (inet_listen() in net/ipv4/af_inet.c) and returns 0.
 *
 * The inherited descriptors are never closed or hidden. A server may close its socket and
 * bind again (OpenVPN does at SIGUSR1 and SIGHUP), and that bind needs the inherited socket
 * again; and closing them would free nothing, as the daemon keeps its own copy of every
 * socket. They stay open across exec as systemd's are, so a script the server runs inherits
 * them, as it would under socket activation.
 *
 * Like sd_listen_fds(3), nothing is done in a process whose pid is not LISTEN_PID (a child the
 * server forked): only the process the daemon started may take the sockets. An exec keeps the
 * pid, so a wrapper script that execs the server works.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define LISTEN_FDS_START 3
/* A bound on LISTEN_FDS, to refuse nonsense: far more listeners than a service has. */
#define MAX_INHERITED 4096
/* Options set on servers' sockets before their bind(), kept to be set again on the inherited
 * socket: a few per socket, a few sockets at a time. */
#define MAX_OPTIONS 32
#define MAX_OPTION_LEN 64

static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);

/* Fixed at load: how many sockets were inherited, 0 when this process may take none. */
static int inherited_count;

struct option_record {
	int fd;
	ino_t inode; /* of the socket the option was set on: the fd may be reused */
	int level, name;
	socklen_t len;
	unsigned char value[MAX_OPTION_LEN];
};

static struct option_record options[MAX_OPTIONS];
static int options_used;
static int options_full_said;
static pthread_mutex_t options_lock = PTHREAD_MUTEX_INITIALIZER;

static int parse_count(const char *text, long max)
{
	char *end;
	long value;

	if (!text || !*text)
		return -1;
	errno = 0;
	value = strtol(text, &end, 10);
	if (errno || *end || value < 0 || value > max)
		return -1;
	return (int)value;
}

__attribute__((constructor)) static void bind_preload_init(void)
{
	const char *pid_text = getenv("LISTEN_PID");
	int count;

	real_bind = dlsym(RTLD_NEXT, "bind");
	real_setsockopt = dlsym(RTLD_NEXT, "setsockopt");
	count = parse_count(getenv("LISTEN_FDS"), MAX_INHERITED);
	if (count <= 0 || !real_bind || !real_setsockopt)
		return;
	if (pid_text && parse_count(pid_text, 0x7fffffff) != getpid())
		return;
	inherited_count = count;
}

static int socket_int(int fd, int name)
{
	int value = -1;
	socklen_t len = sizeof(value);

	if (getsockopt(fd, SOL_SOCKET, name, &value, &len) < 0)
		return -1;
	return value;
}

static int socket_inode(int fd, ino_t *inode)
{
	struct stat st;

	if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode))
		return -1;
	*inode = st.st_ino;
	return 0;
}

/* Whether fd is one of the inherited sockets, or a dup of one (what bind() made of it). */
static int is_inherited(int fd)
{
	ino_t inode, other;
	int i;

	if (!inherited_count || socket_inode(fd, &inode) < 0)
		return 0;
	for (i = 0; i < inherited_count; i++)
		if (socket_inode(LISTEN_FDS_START + i, &other) == 0 && other == inode)
			return 1;
	return 0;
}

/* Same port and address; for IPv6 the scope too (a link-local address names an interface). */
static int same_address(const struct sockaddr *addr, socklen_t len, const struct sockaddr_storage *bound)
{
	if (addr->sa_family != bound->ss_family)
		return 0;
	if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *a = (const void *)addr, *b = (const void *)bound;

		return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
	}
	if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *a = (const void *)addr, *b = (const void *)bound;

		return a->sin6_port == b->sin6_port && !memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) &&
		       a->sin6_scope_id == b->sin6_scope_id;
	}
	return 0;
}

/* The inherited socket bind(fd, addr) should take, or -1. The port must not be 0: a server
 * asking for any port wants a socket of its own. */
static int inherited_match(int fd, const struct sockaddr *addr, socklen_t len)
{
	int domain = socket_int(fd, SO_DOMAIN), type = socket_int(fd, SO_TYPE);
	int protocol = socket_int(fd, SO_PROTOCOL);
	int i;

	if (domain != AF_INET && domain != AF_INET6)
		return -1;
	if (addr->sa_family == AF_INET ? len < sizeof(struct sockaddr_in) || !((const struct sockaddr_in *)addr)->sin_port
				       : len < sizeof(struct sockaddr_in6) || !((const struct sockaddr_in6 *)addr)->sin6_port)
		return -1;
	for (i = 0; i < inherited_count; i++) {
		int candidate = LISTEN_FDS_START + i;
		struct sockaddr_storage bound;
		socklen_t bound_len = sizeof(bound);

		if (socket_int(candidate, SO_DOMAIN) != domain || socket_int(candidate, SO_TYPE) != type ||
		    socket_int(candidate, SO_PROTOCOL) != protocol)
			continue;
		if (getsockname(candidate, (struct sockaddr *)&bound, &bound_len) < 0)
			continue;
		if (same_address(addr, len, &bound))
			return candidate;
	}
	return -1;
}

/* An unbound AF_INET/AF_INET6 socket: only its options can matter to a later bind(). */
static int unbound_inet(int fd)
{
	struct sockaddr_storage local;
	socklen_t len = sizeof(local);

	if (getsockname(fd, (struct sockaddr *)&local, &len) < 0)
		return 0;
	if (local.ss_family == AF_INET)
		return ((struct sockaddr_in *)&local)->sin_port == 0;
	if (local.ss_family == AF_INET6)
		return ((struct sockaddr_in6 *)&local)->sin6_port == 0;
	return 0;
}

/* Forgets records whose socket is gone (its fd closed or reused) or got an address without
 * bind() (connect() binds implicitly): a client socket that sets options is never bound. Called
 * with options_lock held, only when the table is full. */
static void drop_stale_options(void)
{
	int i;

	for (i = 0; i < options_used;) {
		struct option_record *r = &options[i];
		ino_t inode;

		if (socket_inode(r->fd, &inode) == 0 && inode == r->inode && unbound_inet(r->fd))
			i++;
		else
			*r = options[--options_used];
	}
}

/* Records an option the server set on its own unbound socket. Not the reuse options (the
 * daemon's are kept) nor IPV6_V6ONLY (the listener's address family is the daemon's choice,
 * and the kernel refuses to change it once bound). */
static void record_option(int fd, int level, int name, const void *value, socklen_t len)
{
	struct option_record *slot = NULL;
	ino_t inode;
	int i;

	if ((level == SOL_SOCKET && (name == SO_REUSEADDR || name == SO_REUSEPORT)) ||
	    (level == IPPROTO_IPV6 && name == IPV6_V6ONLY))
		return;
	if (len > MAX_OPTION_LEN || socket_inode(fd, &inode) < 0 || !unbound_inet(fd))
		return;
	pthread_mutex_lock(&options_lock);
	for (i = 0; i < options_used; i++) {
		struct option_record *r = &options[i];

		/* A record of an earlier socket on this fd number is stale: reuse it. */
		if (r->fd == fd && (r->inode != inode || (r->level == level && r->name == name))) {
			slot = r;
			break;
		}
	}
	if (!slot && options_used == MAX_OPTIONS)
		drop_stale_options();
	if (!slot && options_used < MAX_OPTIONS)
		slot = &options[options_used++];
	if (slot) {
		*slot = (struct option_record){ .fd = fd, .inode = inode, .level = level, .name = name, .len = len };
		memcpy(slot->value, value, len);
	}
	pthread_mutex_unlock(&options_lock);
	if (!slot && !__atomic_exchange_n(&options_full_said, 1, __ATOMIC_RELAXED))
		fprintf(stderr, "reuseport bind preload: more than %d socket options waiting for a bind(): "
			"those set from now on are not carried over to the slot's socket\n", MAX_OPTIONS);
}

/* Sets the options recorded for fd's socket on target (none when target < 0), and forgets
 * every record of fd: after its bind() the socket is what it is. */
static void replay_options(int fd, int target)
{
	ino_t inode;
	int i;

	if (socket_inode(fd, &inode) < 0)
		return;
	pthread_mutex_lock(&options_lock);
	for (i = 0; i < options_used;) {
		struct option_record *r = &options[i];

		if (r->fd != fd) {
			i++;
			continue;
		}
		if (target >= 0 && r->inode == inode && real_setsockopt(target, r->level, r->name, r->value, r->len) < 0)
			fprintf(stderr, "reuseport bind preload: option %d/%d of fd %d not set on the inherited socket: %s\n",
				r->level, r->name, fd, strerror(errno));
		*r = options[--options_used];
	}
	pthread_mutex_unlock(&options_lock);
}

int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
	int rc;

	if (!real_setsockopt)
		real_setsockopt = dlsym(RTLD_NEXT, "setsockopt");
	if (inherited_count && level == SOL_SOCKET && (name == SO_REUSEADDR || name == SO_REUSEPORT) &&
	    is_inherited(fd))
		return 0;
	rc = real_setsockopt(fd, level, name, value, len);
	if (rc == 0 && inherited_count && value)
		record_option(fd, level, name, value, len);
	return rc;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	int source, fd_flags, status_flags, inherited_flags, saved = errno;

	if (!real_bind)
		real_bind = dlsym(RTLD_NEXT, "bind");
	if (!inherited_count || !addr || (addr->sa_family != AF_INET && addr->sa_family != AF_INET6))
		return real_bind(fd, addr, len);
	source = inherited_match(fd, addr, len);
	if (source < 0 || source == fd) {
		errno = saved;
		replay_options(fd, -1);
		return real_bind(fd, addr, len);
	}
	fd_flags = fcntl(fd, F_GETFD);
	status_flags = fcntl(fd, F_GETFL);
	if (fd_flags < 0 || status_flags < 0)
		return real_bind(fd, addr, len);
	replay_options(fd, source);
	/* O_NONBLOCK belongs to the open file description, which the inherited socket brings
	 * (blocking, as the daemon hands sockets over): set it as the server had it. */
	if (dup3(source, fd, (fd_flags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0)
		return -1;
	inherited_flags = fcntl(fd, F_GETFL);
	if (inherited_flags < 0 || fcntl(fd, F_SETFL, (inherited_flags & ~O_NONBLOCK) | (status_flags & O_NONBLOCK)) < 0)
		return -1;
	fprintf(stderr, "reuseport bind preload: bind() of fd %d takes the inherited socket fd %d\n", fd, source);
	errno = saved;
	return 0;
}
