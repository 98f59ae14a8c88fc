# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""A versioned UDP worker for reuseportd's upgrade tests.

Takes its socket by socket activation (fd 3, as reuseportd hands it; docs/configuration.md) and
answers every datagram in the built-in whoami's format, plus its version and generation:
"slot=<slot> pid=<pid> service=<name> peer=<addr>:<port> version=<VERSION> generation=<gen>\\n<payload>".
Says READY=1 (and STATUS=) over NOTIFY_SOCKET once it serves, as sd_notify(3) does.

Usage: worker.py VERSION [--ready-after-ms N] [--never-ready] [--exit-at-once] [--exit-after-ms N]
                         [--crash-after-ms N]
  --ready-after-ms N  serve at once, but send READY=1 only after N ms (a slow start)
  --never-ready       serve, but never send READY=1
  --exit-at-once      exit with status 3 before serving (a program that cannot start)
  --exit-after-ms N   serve (and say READY=1), then exit with status 4 after N ms (a crash loop)
  --crash-after-ms N  serve (and say READY=1), then die of SIGSEGV after N ms (a crash loop by signal)
"""
import os
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
    server = socket.socket(fileno=3)
    slot = os.environ.get("REUSEPORT_SLOT", "?")
    service = os.environ.get("REUSEPORT_SERVICE", "?")
    generation = os.environ.get("REUSEPORT_GENERATION", "?")
    # The drain signal: this worker takes it as "no new flows will come", and goes on serving.
    signal.signal(signal.SIGUSR2, lambda *_: print(f"version {version} slot {slot}: draining", flush=True))
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
    while True:
        payload, peer = server.recvfrom(65536)
        header = (f"slot={slot} pid={os.getpid()} service={service} peer={peer[0]}:{peer[1]} "
                  f"version={version} generation={generation}\n")
        server.sendto(header.encode() + payload, peer)


if __name__ == "__main__":
    main()
