# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""A versioned worker for reuseportd's upgrade tests.

Takes its sockets by socket activation (LISTEN_FDS of them from fd 3, as reuseportd hands them;
docs/configuration.md) and answers every datagram, and every line of a TCP connection, in the
built-in whoami's format, plus its version and generation:
"slot=<slot> pid=<pid> service=<name> peer=<addr>:<port> version=<VERSION> generation=<gen>\\n<payload>".
Says READY=1 (and STATUS=) over NOTIFY_SOCKET once it serves, as sd_notify(3) does.
The drain signals (SIGUSR2, SIGQUIT) are logged; by default they change nothing: it serves on,
its accepted connections too, until SIGTERM (the default action: it dies, and its connections close).

Usage: worker.py VERSION [--ready-after-ms N] [--never-ready] [--exit-at-once] [--exit-after-ms N]
                         [--crash-after-ms N] [--close-listeners-on-drain]
  --ready-after-ms N  serve at once, but send READY=1 only after N ms (a slow start)
  --never-ready       serve, but never send READY=1
  --exit-at-once      exit with status 3 before serving (a program that cannot start)
  --exit-after-ms N   serve (and say READY=1), then exit with status 4 after N ms (a crash loop)
  --crash-after-ms N  serve (and say READY=1), then die of SIGSEGV after N ms (a crash loop by signal)
  --close-listeners-on-drain
                      at a drain signal, close the TCP listeners and accept nothing more, serving the
                      connections it accepted (as nginx does at SIGQUIT)
"""
import os
import selectors
import signal
import socket
import sys
import threading


def notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as channel:
        channel.sendto(state.encode(), path)


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit("usage: worker.py VERSION [--ready-after-ms N] [--never-ready] [--exit-at-once]")
    version = args[0]
    if "--exit-at-once" in args:
        sys.exit(3)
    ready_after_ms = 0
    if "--ready-after-ms" in args:
        ready_after_ms = int(args[args.index("--ready-after-ms") + 1])
    sockets = [socket.socket(fileno=3 + index) for index in range(int(os.environ.get("LISTEN_FDS", "1")))]
    slot = os.environ.get("REUSEPORT_SLOT", "?")
    service = os.environ.get("REUSEPORT_SERVICE", "?")
    generation = os.environ.get("REUSEPORT_GENERATION", "?")
    # The drain signal: this worker takes it as "no new flows will come", and goes on serving.
    draining = threading.Event()

    def drain(*_) -> None:
        print(f"version {version} slot {slot}: draining", flush=True)
        draining.set()

    for number in (signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(number, drain)
    close_on_drain = "--close-listeners-on-drain" in args
    if "--exit-after-ms" in args:
        crash = threading.Timer(int(args[args.index("--exit-after-ms") + 1]) / 1000, os._exit, args=(4,))
        crash.daemon = True
        crash.start()
    if "--crash-after-ms" in args:
        # As a segfault does: the default action of SIGSEGV, no handler, no exit status.
        crash = threading.Timer(int(args[args.index("--crash-after-ms") + 1]) / 1000, os.kill,
                                args=(os.getpid(), signal.SIGSEGV))
        crash.daemon = True
        crash.start()
    if "--never-ready" not in args:
        timer = threading.Timer(ready_after_ms / 1000, notify,
                                args=(f"READY=1\nSTATUS=version {version}, generation {generation}",))
        timer.daemon = True
        timer.start()

    def header(peer) -> bytes:
        return (f"slot={slot} pid={os.getpid()} service={service} peer={peer[0]}:{peer[1]} "
                f"version={version} generation={generation}\n").encode()

    selector = selectors.DefaultSelector()
    for server in sockets:
        if server.type == socket.SOCK_STREAM:
            server.setblocking(False)
        selector.register(server, selectors.EVENT_READ)
    pending = {}  # accepted connection → (peer, bytes of its unfinished line)
    listening = [server for server in sockets if server.type == socket.SOCK_STREAM]

    def accepting() -> bool:
        """False once a drain signal closed the listeners (--close-listeners-on-drain)."""
        if close_on_drain and draining.is_set():
            for server in listening:
                selector.unregister(server)
                server.close()
            listening.clear()
        return bool(listening)

    while True:
        accepting()
        # A timeout, so that a drain signal that came during select() is acted on.
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            if sock.fileno() < 0:
                continue  # a listener closed in this round
            if sock.type == socket.SOCK_DGRAM:
                while True:
                    try:
                        payload, peer = sock.recvfrom(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    sock.sendto(header(peer) + payload, peer)
            elif sock in pending:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    del pending[sock]
                    sock.close()
                    continue
                peer, line = pending[sock]
                line += data
                while b"\n" in line:
                    first, line = line.split(b"\n", 1)
                    sock.sendall(header(peer) + first + b"\n")
                pending[sock] = (peer, line)
            elif accepting():
                while True:
                    try:
                        connection, peer = sock.accept()
                    except BlockingIOError:
                        break
                    connection.setblocking(True)
                    pending[connection] = (peer, b"")
                    selector.register(connection, selectors.EVENT_READ)


if __name__ == "__main__":
    main()
