// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * A minimal reuseportd worker in C, libc only (no libsystemd needed).
 *
 *   cc -O2 -Wall -o worker worker.c
 *
 * Configure it as:
 *   [[service]]
 *   name = "echo"
 *   listen = ["udp://0.0.0.0:5300", "tcp://0.0.0.0:5300"]
 *   workers = 4
 *   exec = ["/usr/local/bin/worker"]
 *   notify = true            # ready when it says READY=1, not after ready_after_ms
 *   watchdog_ms = 5000       # restarted if it stops sending WATCHDOG=1
 *   drain_signal = "SIGUSR2" # told that its slot is leaving: finish what it holds
 *
 * Its sockets are LISTEN_FDS descriptors from fd 3 on, in the order of `listen`; it never binds
 * one of its own (the slot's socket is what keeps its flows). UDP: each datagram is answered from
 * the socket it came on. TCP: accept() on the listener, answer what each connection sends.
 * sd_notify: READY=1 once serving, WATCHDOG=1 every WATCHDOG_USEC/2, STATUS= for humans.
 * The drain signal: stop accepting, serve open connections until they close, then exit.
 * SIGTERM: exit promptly (the daemon sends SIGKILL at stop_timeout_ms).
 * Each answer is "slot=<REUSEPORT_SLOT> generation=<REUSEPORT_GENERATION> <what was sent>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define LISTEN_FDS_START 3
#define MAX_FDS 256

static volatile sig_atomic_t draining, stopping;

static void on_drain(int sig) { (void)sig; draining = 1; }
static void on_term(int sig) { (void)sig; stopping = 1; }

/* sd_notify(3): one datagram to NOTIFY_SOCKET; nothing when there is none. */
static void notify(const char *state)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd;

	if (!path || strlen(path) >= sizeof(addr.sun_path))
		return;
	strcpy(addr.sun_path, path);
	if (path[0] == '@')
		addr.sun_path[0] = '\0';
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	sendto(fd, state, strlen(state), 0, (struct sockaddr *)&addr,
	       offsetof(struct sockaddr_un, sun_path) + strlen(path));
	close(fd);
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

int main(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	const char *slot = getenv("REUSEPORT_SLOT"), *gen = getenv("REUSEPORT_GENERATION");
	const char *usec = getenv("WATCHDOG_USEC");
	struct pollfd polled[MAX_FDS];
	int listeners, count = 0, connections = 0;
	long long ping_every = usec ? atoll(usec) / 2000 : 0, next_ping;
	char prefix[64], buf[65536 + 64], status[128];
	size_t plen;

	/* sd_listen_fds(3): the sockets are ours only if LISTEN_PID names this process. */
	if (!pid || !fds || atoi(pid) != getpid() || (listeners = atoi(fds)) < 1 || listeners > MAX_FDS / 2) {
		fprintf(stderr, "no sockets passed (LISTEN_PID/LISTEN_FDS): start me from reuseportd\n");
		return 2;
	}
	plen = (size_t)snprintf(prefix, sizeof(prefix), "slot=%s generation=%s ", slot ? slot : "?", gen ? gen : "?");
	signal(SIGUSR2, on_drain);
	signal(SIGTERM, on_term);
	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < listeners; i++) {
		int fd = LISTEN_FDS_START + i;

		fcntl(fd, F_SETFD, FD_CLOEXEC);
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		polled[count++] = (struct pollfd){ .fd = fd, .events = POLLIN };
	}
	snprintf(status, sizeof(status), "READY=1\nSTATUS=serving %d sockets%s", listeners, ping_every ? "\nWATCHDOG=1" : "");
	notify(status);
	next_ping = now_ms() + ping_every;

	while (!stopping) {
		int timeout = ping_every ? (int)(next_ping > now_ms() ? next_ping - now_ms() : 0) : 1000;

		if (draining && listeners > 0) {
			/* No new work: the daemon steers new flows elsewhere. Open connections go on. */
			memmove(polled, polled + listeners, (size_t)(count - listeners) * sizeof(polled[0]));
			count -= listeners;
			listeners = 0;
			notify("STATUS=draining");
		}
		if (draining && connections == 0)
			break;
		if (poll(polled, (nfds_t)count, timeout) < 0 && errno != EINTR)
			return 1;
		for (int i = 0; i < count; i++) {
			int fd = polled[i].fd, type = 0;
			socklen_t len = sizeof(type);

			if (!(polled[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			polled[i].revents = 0;
			getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len);
			if (i < listeners && type == SOCK_DGRAM) {
				struct sockaddr_storage peer;
				ssize_t n;

				for (;;) {
					socklen_t plen2 = sizeof(peer);

					n = recvfrom(fd, buf + plen, sizeof(buf) - plen, 0, (struct sockaddr *)&peer, &plen2);
					if (n < 0)
						break;
					memcpy(buf, prefix, plen);
					sendto(fd, buf, plen + (size_t)n, 0, (struct sockaddr *)&peer, plen2);
				}
			} else if (i < listeners) {
				int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);

				if (conn >= 0 && count < MAX_FDS) {
					polled[count++] = (struct pollfd){ .fd = conn, .events = POLLIN };
					connections++;
				} else if (conn >= 0) {
					close(conn);
				}
			} else {
				ssize_t n = read(fd, buf + plen, sizeof(buf) - plen);

				if (n > 0) {
					memcpy(buf, prefix, plen);
					(void)!write(fd, buf, plen + (size_t)n);
				} else if (n == 0 || errno != EAGAIN) {
					close(fd);
					polled[i--] = polled[--count];
					connections--;
				}
			}
		}
		if (ping_every && now_ms() >= next_ping) {
			notify("WATCHDOG=1");
			next_ping += ping_every;
		}
	}
	notify("STOPPING=1");
	return 0;
}
