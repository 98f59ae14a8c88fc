#!/usr/bin/env bash
# Fetches a Debian cloud kernel and prints the path of its vmlinuz.
#
#   Tests/vm/fetch-kernel.sh KERNEL
#
# KERNEL is 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), or a Debian suite name
# (e.g. testing, the newest kernel Debian ships; bookworm-backports): the suite's
# linux-image-cloud-amd64 is resolved to the versioned image package, downloaded with a
# private apt configuration (its own sources.list, state and cache under
# $VM_DIR/apt/<suite>; the system's apt is not touched), and its kernel extracted to
# $VM_DIR/kernels/<KERNEL>/vmlinuz. Up to 6.x the image package holds /boot/vmlinuz-*;
# from 7.x it holds no kernel and depends on linux-binary-<version>-cloud-amd64, which
# has it at /usr/lib/modules/<version>/vmlinuz: both layouts are handled.
# A kernel fetched once is reused without any network access; delete its folder
# to fetch the suite's current one again.
#
# Environment: VM_DIR (default .output/vm), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), V=1 for apt's output.
set -euo pipefail

kernel=${1:?usage: fetch-kernel.sh KERNEL}
vm_dir=${VM_DIR:-.output/vm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

case $kernel in
5.10) suite=bullseye ;;
6.1) suite=bookworm ;;
6.12) suite=trixie ;;
*[!a-z-]* | '') echo "fetch-kernel: unknown kernel '$kernel' (use 5.10, 6.1, 6.12 or a Debian suite name such as testing)" >&2; exit 2 ;;
*) suite=$kernel ;;
esac

out=$vm_dir/kernels/$kernel
if [ -s "$out/vmlinuz" ] && [ -s "$out/package" ]; then
    echo "$out/vmlinuz"
    exit 0
fi

quiet() { if [ "${V:-}" = 1 ]; then "$@" >&2; else "$@" >/dev/null; fi; }

apt_dir=$(realpath -m "$vm_dir/apt/$suite")
mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$out"
: >"$apt_dir/state/status"
# Backports and other add-on suites need their base suite beside them.
base=${suite%%-*}
{
    echo "deb [signed-by=$keyring] $mirror $base main"
    [ "$base" = "$suite" ] || echo "deb [signed-by=$keyring] $mirror $suite main"
} >"$apt_dir/sources.list"
apt=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::Etc::Preferences=$apt_dir/preferences" -o "Dir::Etc::PreferencesParts=$apt_dir/parts"
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status"
    -o "Dir::Cache=$apt_dir/cache" -o "APT::Architecture=amd64" -o "APT::Architectures=amd64"
    -o "Acquire::Languages=none" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
)
if [ "$base" != "$suite" ]; then
    # Prefer the add-on suite's kernel over the base one.
    printf 'Package: linux-image-*\nPin: release n=%s\nPin-Priority: 900\n' "$suite" >"$apt_dir/preferences"
else
    : >"$apt_dir/preferences"
fi

quiet apt-get "${apt[@]}" update
# linux-image-cloud-amd64 is a meta package; its dependency names the versioned image.
image=$(apt-cache "${apt[@]}" depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\).*/\1/p' | head -n1)
if [ -z "$image" ]; then
    echo "fetch-kernel: $suite has no linux-image-cloud-amd64 in $mirror" >&2
    exit 1
fi
version=$(apt-cache "${apt[@]}" show --no-all-versions "$image" | sed -n 's/^Version: //p' | head -n1)
# From 7.x the image package is a shell that depends on linux-binary-<version>-cloud-amd64.
binary=$(apt-cache "${apt[@]}" depends "$image" | sed -n 's/^ *Depends: \(linux-binary-[0-9][^ ]*-cloud-amd64\).*/\1/p' | head -n1)
(cd "$apt_dir/cache/archives" && quiet apt-get "${apt[@]}" download "$image" ${binary:+"$binary"})

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for package in "$image" $binary; do
    deb=$(ls "$apt_dir"/cache/archives/"${package}"_*.deb | head -n1)
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards --no-wildcards-match-slash \
        './boot/vmlinuz-*' './usr/lib/modules/*/vmlinuz' 2>/dev/null || true
done
kernel_file=$(ls "$tmp"/boot/vmlinuz-* "$tmp"/usr/lib/modules/*/vmlinuz 2>/dev/null | head -n1 || true)
if [ -z "$kernel_file" ]; then
    echo "fetch-kernel: neither $image nor ${binary:-its dependencies} holds a vmlinuz" >&2
    exit 1
fi
mv "$kernel_file" "$out/vmlinuz"
echo "$image $version ($suite)" >"$out/package"
echo "$out/vmlinuz"
