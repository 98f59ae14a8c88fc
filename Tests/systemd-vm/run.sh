#!/usr/bin/env bash
# reuseportd under a real systemd as PID 1: a Debian root (mmdebstrap, Debian's packages, cached),
# the package that `make deb` built, and Tests/systemd-vm/guest-test.sh as a service, all in one
# initramfs booted under QEMU with a Debian cloud kernel (Tests/vm/fetch-kernel.sh). The guest
# installs the package with dpkg and drives the daemon with systemctl; this script reads its
# CHECK lines from the serial console and fails unless every check passed.
#
#   Tests/systemd-vm/run.sh DEB          (make systemd-test)
#
# Environment:
#   VM_DIR       work folder (default .output/systemd-vm): the root tar, the initramfs, the log
#   SUITE        Debian suite of the root (default trixie: systemd 257, which has Type=notify-reload)
#   KERNEL       as for fetch-kernel.sh (default 6.12, trixie's)
#   KVM=1        KVM instead of TCG; VM_TIMEOUT seconds (default 600); VM_MEMORY (default 2G)
#   V=1          show the serial console as it runs
set -euo pipefail

deb=$(realpath "${1:?usage: run.sh DEB}")
here=$(realpath "$(dirname "$0")")
vm_dir=${VM_DIR:-.output/systemd-vm}
suite=${SUITE:-trixie}
kernel=${KERNEL:-6.12}
timeout=${VM_TIMEOUT:-600}
mkdir -p "$vm_dir"
vm_dir=$(realpath "$vm_dir")

# The root: a minimal Debian with systemd as init, what the guest test calls (socat for datagrams,
# procps for pgrep), and the package's dependencies (the guest has no network: dpkg -i must find
# them installed; apt picks a suite's sole provider of a name, libcurl4t64 for libcurl4 in trixie).
# man-db: the guest reads the installed man pages as a user would (`man reuseportd`).
# Built once per suite and package list (about 20 s and 60 MB of packages).
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/(.*)//; s/|.*//; s/ //g' | grep . | paste -sd, -)
packages="systemd,systemd-sysv,iproute2,procps,socat,man-db,$depends"
root_tar=$vm_dir/$suite-root-$(echo "$packages" | md5sum | cut -c1-8).tar
if [ ! -s "$root_tar" ]; then
    printf '  %-8s %s\n' ROOT "mmdebstrap $suite (cached in $root_tar)"
    mmdebstrap --quiet --variant=minbase --format=tar \
        --include="$packages" "$suite" "$root_tar.tmp"
    mv "$root_tar.tmp" "$root_tar"
fi

vmlinuz=$(VM_DIR=$(dirname "$vm_dir")/vm "$here/../vm/fetch-kernel.sh" "$kernel")

# The initramfs: the root as it is, the package to install, the test as a service.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
tar -x -C "$root" -f "$root_tar"
install -m 0644 "$deb" "$root/root/reuseportd.deb"
install -m 0755 "$here/guest-test.sh" "$root/root/guest-test.sh"
install -m 0644 "$here/reuseportd-guest-test.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/reuseportd-guest-test.service \
    "$root/etc/systemd/system/multi-user.target.wants/reuseportd-guest-test.service"
# Not a first boot (systemd-firstboot would ask for a locale on the console), no login prompt.
echo 0123456789abcdef0123456789abcdef >"$root/etc/machine-id"
for unit in systemd-firstboot.service serial-getty@ttyS0.service getty@tty1.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
initramfs=$vm_dir/initramfs.cpio.gz
printf '  %-8s %s\n' CPIO "$initramfs"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$initramfs.tmp"
mv "$initramfs.tmp" "$initramfs"

if [ "${KVM:-}" = 1 ]; then accel=(-accel kvm -cpu host); else accel=(-accel tcg); fi
log=$vm_dir/console.log
printf '  %-8s %s\n' VM "$(cat "$(dirname "$vmlinuz")/package"), systemd from $suite (serial log: $log)"
start=$(date +%s)
qemu=0
timeout -k 10 "$timeout" qemu-system-x86_64 "${accel[@]}" -m "${VM_MEMORY:-2G}" -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$vmlinuz" -initrd "$initramfs" \
    -append "console=ttyS0 rdinit=/sbin/init panic=-1 systemd.show_status=false" </dev/null 2>&1 \
    | stdbuf -oL tr -d '\r' | if [ "${V:-}" = 1 ]; then tee "$log"; else cat >"$log"; fi || qemu=$?
elapsed=$(($(date +%s) - start))

grep -aE '^(SYSTEMD |KERNEL |CHECK |JOURNAL |SYSTEMD-VM-|[0-9]+ passed, [0-9]+ failed)' "$log" >"$vm_dir/results.txt" || true
sed -n 's/^CHECK \([^ ]*\) \(PASS\|FAIL\) \(.*\)/    \2  \1: \3/p' "$vm_dir/results.txt"
sed -n 's/^JOURNAL /    | /p' "$vm_dir/results.txt"
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$vm_dir/results.txt" | tail -n1 || true)
if ! grep -q '^SYSTEMD-VM-END' "$vm_dir/results.txt" || [ -z "$summary" ]; then
    why=$([ "$qemu" = 124 ] && echo "timed out after $timeout s" || echo "qemu exited ($qemu)")
    echo "  VM       did not report: $why; serial log: $log"
    tail -n 20 "$log" | sed 's/^/    | /'
    exit 1
fi
boot=$(sed -n 's/^SYSTEMD-VM-BEGIN uptime=\([0-9]*\).*/\1/p' "$vm_dir/results.txt")
printf '  %-8s %s (%s; %s s, of which boot %s s)\n' VM "$summary" \
    "$(sed -n 's/^SYSTEMD //p' "$vm_dir/results.txt" | cut -d' ' -f1-2)" "$elapsed" "${boot:-?}"
echo "$summary"
grep -q '^SYSTEMD-VM-END status=0' "$vm_dir/results.txt"
