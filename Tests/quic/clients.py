# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""QUIC clients behind a rebinding NAT, for reuseportd's tests.

A UDP relay stands between the clients and the server: it forwards each client's datagrams
from a socket of its own, and every REBIND seconds replaces that socket by a new one (a new
source port), as a NAT that rebinds does. Replies reaching a replaced socket are still
forwarded for a while (they were in flight).

Each of CLIENTS aioquic clients opens a connection through the relay and, for DURATION
seconds, sends a request on a new stream every INTERVAL seconds; the worker answers
"<pid> ..." (Tests/quic/worker.py). Prints one JSON object: per connection, whether it
completed (every request answered, in time) and the pids that answered.

Usage: clients.py SERVER_HOST SERVER_PORT [--clients 64] [--duration 5] [--rebind 0.2]
"""
import argparse
import asyncio
import contextlib
import json
import socket
import ssl
import time

from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration


class RebindingRelay:
    """Client address -> a socket of its own towards the server, replaced every `interval` s."""

    def __init__(self, server: tuple, interval: float, linger: float = 2.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = server
        self.interval = interval
        self.linger = linger
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.loop.add_reader(self.front, self._from_client)
        self.upstream: dict = {}
        self.retired: list = []
        self.rebinds = 0
        self.ports: set = set()
        self.task = self.loop.create_task(self._rebind_forever())

    @property
    def address(self) -> tuple:
        return self.front.getsockname()

    def _open(self, client: tuple) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self.ports.add(sock.getsockname()[1])
        self.loop.add_reader(sock, self._from_server, sock, client)
        self.upstream[client] = sock
        return sock

    def _from_client(self) -> None:
        while True:
            try:
                data, client = self.front.recvfrom(65536)
            except BlockingIOError:
                return
            sock = self.upstream.get(client) or self._open(client)
            try:
                sock.sendto(data, self.server)
            except BlockingIOError:
                pass

    def _from_server(self, sock: socket.socket, client: tuple) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, OSError):
                return
            try:
                self.front.sendto(data, client)
            except BlockingIOError:
                pass

    async def _rebind_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for client, old in list(self.upstream.items()):
                self._open(client)
                self.retired.append((now + self.linger, old))
                self.rebinds += 1
            while self.retired and self.retired[0][0] <= now:
                _, sock = self.retired.pop(0)
                self.loop.remove_reader(sock)
                sock.close()

    def close(self) -> None:
        self.task.cancel()
        for sock in list(self.upstream.values()) + [s for _, s in self.retired] + [self.front]:
            self.loop.remove_reader(sock)
            sock.close()


async def one_client(index: int, relay: tuple, duration: float, interval: float, timeout: float) -> dict:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=["reuseportd-test"], idle_timeout=30.0)
    configuration.verify_mode = ssl.CERT_NONE
    result = {"client": index, "pids": [], "answered": 0, "requests": 0, "completed": False, "error": None}
    try:
        async with contextlib.AsyncExitStack() as stack:
            protocol = await asyncio.wait_for(
                stack.enter_async_context(connect(relay[0], relay[1], configuration=configuration)), timeout)
            end = time.monotonic() + duration
            while time.monotonic() < end:
                result["requests"] += 1
                reader, writer = await protocol.create_stream()
                writer.write(f"request {result['requests']} of client {index}".encode())
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), timeout)
                result["pids"].append(int(reply.split(b" ", 1)[0]))
                result["answered"] += 1
                await asyncio.sleep(interval)
            result["completed"] = result["answered"] == result["requests"]
            protocol.close()
    except Exception as error:  # a lost connection shows as a timeout
        result["error"] = f"{type(error).__name__}: {error}"
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--rebind", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=3.0)
    arguments = parser.parse_args()
    relay = RebindingRelay((arguments.host, arguments.port), arguments.rebind)
    started = time.monotonic()
    results = await asyncio.gather(*(
        one_client(index, relay.address, arguments.duration, arguments.interval, arguments.timeout)
        for index in range(arguments.clients)))
    relay.close()
    print(json.dumps({"connections": results, "rebinds": relay.rebinds, "relay_ports": len(relay.ports),
                      "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    asyncio.run(main())
