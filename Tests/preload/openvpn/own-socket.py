#!/usr/bin/env python3
# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
"""own-socket.py PORT PROGRAM [ARG...]: the kernel's own SO_REUSEPORT, for the comparison in
BindPreloadOpenVPNTests. Binds udp 0.0.0.0:PORT with SO_REUSEPORT, as a server that joins a
reuseport group itself does, and execs PROGRAM with that socket as fd 3 (LISTEN_FDS=1, LISTEN_PID:
its own pid, which exec keeps), for the bind preload library in LD_PRELOAD to hand to the server's
bind(). This process holds the only copy: the socket dies with the server, and a server started
again binds a new one, which joins the group at its end, as without reuseportd.
"""
import os
import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("0.0.0.0", int(sys.argv[1])))
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
    sock.close()
# Python makes its sockets close-on-exec, and dup2() onto the same number keeps the flag.
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
