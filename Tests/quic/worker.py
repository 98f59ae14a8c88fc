# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""A QUIC worker for reuseportd's tests: aioquic on the socket it is handed (fd 3).

Socket activation as reuseportd does it (LISTEN_FDS, LISTEN_PID; docs/configuration.md).
With REUSEPORT_QUIC_SERVER_ID, REUSEPORT_QUIC_CID_LENGTH and REUSEPORT_QUIC_CONFIG_ROTATION
set, every connection ID it issues has the QUIC-LB plaintext layout (docs/quic.md):
first octet (config rotation in its top 3 bits), the server ID, random octets.

aioquic draws its CIDs from os.urandom(configuration.connection_id_length) in
aioquic/quic/connection.py; that module also calls os.urandom(16) for reset tokens and
os.urandom(8) for path challenges. Only the module's `os` is replaced, by one whose urandom
shapes the calls of exactly the CID length (which the tests keep apart from 8 and 16).

Each stream is answered with "<pid> <what was received>", then closed: the client learns
which process served every request of its connection.

Usage: worker.py CERTIFICATE KEY
"""
import asyncio
import os
import socket
import sys
import types

import aioquic.quic.connection as quic_connection
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

DEFAULT_CID_LENGTH = 12


def cid_layout_os(server_id: bytes, cid_length: int, rotation: int) -> types.SimpleNamespace:
    """An `os` for aioquic's connection module whose urandom(cid_length) is a QUIC-LB CID."""
    real = os.urandom
    own = cid_length - 1 - len(server_id)
    if own < 4:
        raise SystemExit(f"worker: a CID of {cid_length} octets cannot hold server ID {server_id.hex()}")

    def urandom(n: int) -> bytes:
        if n != cid_length:
            return real(n)
        first = (rotation << 5) | (real(1)[0] & 0x1F)
        return bytes([first]) + server_id + real(own)

    shaped = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    shaped.urandom = urandom
    return shaped


class Echo(QuicConnectionProtocol):
    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            reply = f"{os.getpid()} ".encode() + event.data
            self._quic.send_stream_data(event.stream_id, reply, end_stream=event.end_stream)
            self.transmit()


async def serve(certificate: str, key: str) -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        raise SystemExit("worker: no socket handed over (LISTEN_PID, LISTEN_FDS)")
    cid_length = int(os.environ.get("REUSEPORT_QUIC_CID_LENGTH", DEFAULT_CID_LENGTH))
    server_id = os.environ.get("REUSEPORT_QUIC_SERVER_ID")
    if server_id is not None:
        rotation = int(os.environ.get("REUSEPORT_QUIC_CONFIG_ROTATION", "0"))
        quic_connection.os = cid_layout_os(bytes.fromhex(server_id), cid_length, rotation)
    configuration = QuicConfiguration(is_client=False, alpn_protocols=["reuseportd-test"],
                                      connection_id_length=cid_length, idle_timeout=30.0)
    configuration.load_cert_chain(certificate, key)
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=3)
    sock.setblocking(False)
    await loop.create_datagram_endpoint(lambda: QuicServer(configuration=configuration, create_protocol=Echo),
                                        sock=sock)
    print(f"worker {os.getpid()} slot {os.environ.get('REUSEPORT_SLOT')} server id {server_id}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
