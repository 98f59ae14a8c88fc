#!/usr/bin/env python3
# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""A minimal reuseportd worker in Python, standard library only.

Configure it as:
    [[service]]
    name = "echo"
    listen = ["udp://0.0.0.0:5300", "tcp://0.0.0.0:5300"]
    workers = 4
    exec = ["/usr/bin/python3", "/usr/share/doc/reuseportd/examples/worker.py"]
    notify = true            # ready when it says READY=1, not after ready_after_ms
    watchdog_ms = 5000       # restarted if it stops sending WATCHDOG=1
    drain_signal = "SIGUSR2" # told that its slot is leaving: finish what it holds

What it shows:
- its sockets: LISTEN_FDS of them from fd 3 on, in the order of `listen` (LISTEN_FDNAMES names
  them); never bind() a socket of its own: the slot's socket is what keeps its flows;
- UDP: answer each datagram from the socket it came on; TCP: accept() on the listener;
- sd_notify: READY=1 once it serves, WATCHDOG=1 every WATCHDOG_USEC/2, STATUS= for humans;
- the drain signal: stop accepting, serve open connections until they close, then exit;
- SIGTERM: exit promptly (the daemon sends SIGKILL at stop_timeout_ms).

Each answer is "slot=<REUSEPORT_SLOT> generation=<REUSEPORT_GENERATION> <what was sent>".
"""
import os
import selectors
import signal
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(state: str) -> None:
    """sd_notify(3): one datagram to NOTIFY_SOCKET; nothing when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as channel:
        channel.sendto(state.encode(), path)


def listen_sockets() -> list:
    """The sockets passed by socket activation (sd_listen_fds(3)): checked, not taken blindly."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        raise SystemExit("LISTEN_PID is not this process: start me from reuseportd")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    if count < 1:
        raise SystemExit("no LISTEN_FDS: start me from reuseportd")
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


def main() -> None:
    slot = os.environ.get("REUSEPORT_SLOT", "?")
    generation = os.environ.get("REUSEPORT_GENERATION", "?")
    prefix = f"slot={slot} generation={generation} ".encode()
    draining = False
    stopping = False

    def on_drain(*_):
        nonlocal draining
        draining = True

    def on_term(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGUSR2, on_drain)
    signal.signal(signal.SIGTERM, on_term)

    selector = selectors.DefaultSelector()
    listeners = listen_sockets()
    for sock in listeners:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, "listener")

    watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
    next_ping = time.monotonic() + watchdog / 2 if watchdog else None
    notify(f"READY=1\nSTATUS=serving {len(listeners)} sockets" + ("\nWATCHDOG=1" if watchdog else ""))
    connections = 0

    while not stopping:
        if draining and listeners:
            # No new work: the daemon steers new flows elsewhere. Open connections go on.
            for sock in listeners:
                selector.unregister(sock)
            listeners = []
            notify(f"STATUS=draining, {connections} connections open")
        if draining and connections == 0:
            break
        timeout = None if next_ping is None else max(0.0, next_ping - time.monotonic())
        for key, _ in selector.select(timeout if timeout is not None else 1.0):
            sock = key.fileobj
            if key.data == "listener" and sock.type == socket.SOCK_DGRAM:
                while True:
                    try:
                        payload, peer = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    sock.sendto(prefix + payload, peer)
            elif key.data == "listener":
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ, "connection")
                connections += 1
            else:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if data:
                    sock.sendall(prefix + data)
                else:
                    selector.unregister(sock)
                    sock.close()
                    connections -= 1
        if next_ping is not None and time.monotonic() >= next_ping:
            notify("WATCHDOG=1")
            next_ping += watchdog / 2
    notify("STOPPING=1")


if __name__ == "__main__":
    main()
