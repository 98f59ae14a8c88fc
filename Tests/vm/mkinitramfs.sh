#!/usr/bin/env bash
# Builds the test VM's initramfs: busybox (static), the init script, and the given static
# executables in /bin. The cloud kernels need no module for it: the initramfs, the serial
# console, loopback and bpffs are built in.
#
#   Tests/vm/mkinitramfs.sh OUT.cpio.gz EXECUTABLE...
set -euo pipefail

out=${1:?usage: mkinitramfs.sh OUT.cpio.gz EXECUTABLE...}
shift
here=$(dirname "$0")
busybox=/bin/busybox
# ldd fails on a static executable ("not a dynamic executable").
is_static() { ! ldd "$1" >/dev/null 2>&1; }
if ! is_static "$busybox"; then
    echo "mkinitramfs: $busybox is not static: install busybox-static" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,run}
cp "$busybox" "$root/bin/busybox"
install -m 0755 "$here/init" "$root/init"
for exe in "$@"; do
    if ! is_static "$exe"; then
        echo "mkinitramfs: $exe is not statically linked: it cannot run in the VM" >&2
        exit 1
    fi
    install -m 0755 "$exe" "$root/bin/"
done
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0) | gzip -1 >"$out.tmp"
mv "$out.tmp" "$out"
