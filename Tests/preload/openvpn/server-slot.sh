#!/bin/sh
# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
# An OpenVPN server as a reuseportd worker (server-slot.sh CONFIG [OPENVPN OPTION...]): the pattern of docs/configuration.md ("Running a
# server without socket activation"). Every worker runs the same configuration file ($1); what
# must differ per worker comes from REUSEPORT_SLOT: its tun device (tun<slot>) and its client
# address pool (10.8.<slot>.0/24), so that a client's tunnel address names the slot that serves it.
# exec keeps the pid: the worker the daemon watches (and LISTEN_PID) is OpenVPN itself.
slot=${REUSEPORT_SLOT:?not started by reuseportd: REUSEPORT_SLOT is unset}
config=$1
shift
exec /usr/sbin/openvpn --config "$config" --dev "tun$slot" --server "10.8.$slot.0" 255.255.255.0 "$@"
