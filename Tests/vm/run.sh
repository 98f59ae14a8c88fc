#!/usr/bin/env bash
# Boots each kernel under QEMU with the test initramfs, reads kernel-check's results from
# the serial console, and prints a table kernel x check. Fails if any check fails or any
# VM does not report.
#
#   Tests/vm/run.sh INITRAMFS KERNEL...        (make vmtest calls it)
#
# KERNEL as for fetch-kernel.sh (5.10, 6.1, 6.12, a Debian suite), or a path to a vmlinuz.
# Environment:
#   VM_DIR       work folder (default .output/vm); results go to $VM_DIR/results
#   KVM=1        use KVM instead of software emulation (TCG, the default: KVM hangs here)
#   BREAK=CHECK  make CHECK expect a wrong result in every VM (shows the suite can fail)
#   VM_TIMEOUT   seconds one VM may take, boot to power-off (default 900)
#   VM_MEMORY    guest memory (default 512M); VM_CPUS guest CPUs (default 1)
#   V=1          show the serial console as it runs
set -euo pipefail

initramfs=${1:?usage: run.sh INITRAMFS KERNEL...}
shift
[ $# -gt 0 ] || { echo "run.sh: no kernel given" >&2; exit 2; }
here=$(dirname "$0")
export VM_DIR=${VM_DIR:-.output/vm}
results=$VM_DIR/results
timeout=${VM_TIMEOUT:-900}
mkdir -p "$results"

if [ "${KVM:-}" = 1 ]; then
    accel=(-accel kvm -cpu host)
else
    accel=(-accel tcg)
fi
cmdline="console=ttyS0 quiet loglevel=3 panic=-1${BREAK:+ kernel_check.break=$BREAK}"

status=0
labels=()
for kernel in "$@"; do
    if [ -f "$kernel" ]; then
        vmlinuz=$kernel
        label=$(basename "$kernel")
        package=$kernel
    else
        label=$kernel
        if ! vmlinuz=$("$here/fetch-kernel.sh" "$kernel"); then
            printf '  VM       %-6s cannot fetch the kernel\n' "$label"
            status=1
            continue
        fi
        package=$(cat "$(dirname "$vmlinuz")/package")
    fi
    labels+=("$label")
    log=$results/$label.log
    [ "${V:-}" = 1 ] && echo "qemu-system-x86_64 ${accel[*]} -kernel $vmlinuz -append '$cmdline'"
    start=$(date +%s)
    qemu=0
    timeout -k 10 "$timeout" qemu-system-x86_64 "${accel[@]}" -m "${VM_MEMORY:-512M}" -smp "${VM_CPUS:-1}" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$vmlinuz" -initrd "$initramfs" -append "$cmdline" </dev/null 2>&1 \
        | tr -d '\r' | if [ "${V:-}" = 1 ]; then tee "$log"; else cat >"$log"; fi || qemu=$?
    elapsed=$(($(date +%s) - start))

    # The suite's own lines, without kernel messages.
    grep -E '^(KERNEL |CHECK |VALUE |VM-BEGIN|VM-END|[0-9]+ passed, [0-9]+ failed)' "$log" >"$results/$label.txt" || true
    boot=$(sed -n 's/^VM-BEGIN uptime=\([0-9]*\)\..*/\1/p' "$results/$label.txt")
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$results/$label.txt" | tail -n1 || true)
    if ! grep -q '^VM-END status=' "$results/$label.txt" || [ -z "$summary" ]; then
        why=$([ "$qemu" = 124 ] && echo "timed out after ${timeout} s" || echo "qemu exited ($qemu)")
        printf '  VM       %-6s did not report: %s; serial log: %s\n' "$label" "$why" "$log"
        [ "${V:-}" = 1 ] || tail -n 15 "$log" | sed 's/^/    | /'
        echo "VM-MISSING $why" >>"$results/$label.txt"
        status=1
        continue
    fi
    grep -q '^VM-END status=0' "$results/$label.txt" || status=1
    printf '  VM       %-6s %s: %s (%s s, of which boot %s s)\n' "$label" "$package" "$summary" "$elapsed" "${boot:-?}"
    grep '^CHECK [^ ]* FAIL' "$results/$label.txt" | sed 's/^/    /' || true
    echo "VM-TIME total=$elapsed boot=${boot:-?} package=$package" >>"$results/$label.txt"
done

[ ${#labels[@]} -gt 0 ] && "$here/table.sh" "$results" "${labels[@]}"
exit $status
