#!/usr/bin/env python3
# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""A server that binds its own sockets and knows nothing of socket activation, for
BindPreloadTests: what `preload_bind = true` is for.

    bind_server.py udp:127.0.0.1:PORT tcp:127.0.0.1:PORT udp:[::1]:PORT ...

Each socket is made as such servers make theirs: SO_REUSEADDR and SO_REUSEPORT, a receive buffer
of its own (SO_RCVBUF 262144), non-blocking and close-on-exec (Python's default), bound, and
listening for TCP. Each datagram (TCP: each line) is answered in the whoami format
(`slot=.. pid=.. service=.. peer=..`) with what the test checks about the socket that got it:
`inherited` (yes when it is one of the LISTEN_FDS sockets, by inode), `nonblock`, `cloexec`,
`rcvbuf` (the kernel's doubled value), then a newline and the payload.
"""
import fcntl
import os
import selectors
import socket
import sys

SLOT = os.environ.get("REUSEPORT_SLOT", "-")
SERVICE = os.environ.get("REUSEPORT_SERVICE", "-")
INHERITED = set()
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    INHERITED.add(os.fstat(fd).st_ino)


def describe(sock, peer):
    host, port = peer[0], peer[1]
    peer_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cloexec = fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    return (f"slot={SLOT} pid={os.getpid()} service={SERVICE} peer={peer_text} "
            f"inherited={'yes' if os.fstat(sock.fileno()).st_ino in INHERITED else 'no'} "
            f"nonblock={'yes' if not sock.getblocking() else 'no'} cloexec={'yes' if cloexec else 'no'} "
            f"rcvbuf={sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}\n").encode()


def listener(spec):
    kind, rest = spec.split(":", 1)
    host, port = rest.rsplit(":", 1)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 262144)
    sock.setblocking(False)
    sock.bind((host.strip("[]"), int(port)))
    if kind == "tcp":
        sock.listen(64)
    return kind, sock


def main():
    selector = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        kind, sock = listener(spec)
        selector.register(sock, selectors.EVENT_READ, kind)
    print(f"serving {len(sys.argv) - 1} sockets", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if key.data == "udp":
                try:
                    payload, peer = sock.recvfrom(65535)
                except BlockingIOError:
                    continue
                sock.sendto(describe(sock, peer) + payload, peer)
            elif key.data == "tcp":
                try:
                    connection, peer = sock.accept()
                except BlockingIOError:
                    continue
                header = describe(sock, peer)
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ, (header, bytearray()))
            else:
                header, pending = key.data
                data = sock.recv(65535)
                if not data:
                    selector.unregister(sock)
                    sock.close()
                    continue
                pending += data
                while b"\n" in pending:
                    line, _, rest = pending.partition(b"\n")
                    sock.sendall(header + line + b"\n")
                    pending[:] = rest


if __name__ == "__main__":
    main()
