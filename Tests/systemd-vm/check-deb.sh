#!/usr/bin/env bash
# Checks the Debian package that `make deb` built, as a user would get it: its control fields,
# its conffile, every file the README promises (owned by root), binaries that run (the daemon fully
# static, reuseportctl needing only what Depends names), a configuration that passes --check (and one
# with preload_bind, which needs the bind preload library where the daemon looks), units
# that name the installed binaries, man pages that render. Then lintian, when installed (its
# findings are printed, not fatal).
#
#   DEB_FILE=.output/reuseportd_<version>_amd64.deb Tests/systemd-vm/check-deb.sh   (make deb-check)
# Prints one line per check and "N passed, N failed"; fails if any check fails.
set -euo pipefail

deb=${DEB_FILE:?set DEB_FILE}
passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@" >/dev/null 2>&1; then
        passed=$((passed + 1))
        printf '    ok    %s\n' "$what"
    else
        failed=$((failed + 1))
        printf '    FAIL  %s\n' "$what"
    fi
}

info=$(dpkg-deb --info "$deb")
contents=$(dpkg-deb --contents "$deb")
has_field() { grep -q "^ $1: $2" <<<"$info"; }
has_file() { grep -qE "^[^ ]+ root/root +[0-9]+ [0-9-]+ [0-9:]+ \./$1( |$)" <<<"$contents"; }

check "control: Package reuseportd" has_field Package reuseportd
check "control: Version" has_field Version '[0-9]'
check "control: Architecture $(dpkg --print-architecture)" has_field Architecture "$(dpkg --print-architecture)"
check "control: Depends names reuseportctl's shared libraries" \
    bash -c 'grep "^ Depends:" <<<"$0" | grep -q "libbpf1" && grep "^ Depends:" <<<"$0" | grep -q "libcurl4"' "$info"
check "conffile /etc/reuseportd/reuseportd.toml" \
    bash -c 'dpkg-deb --ctrl-tarfile "$0" | tar -xO ./conffiles | grep -qx /etc/reuseportd/reuseportd.toml' "$deb"
for file in usr/bin/reuseportd usr/bin/reuseportctl \
    usr/lib/systemd/system/reuseportd.service usr/lib/systemd/system/reuseportd-metrics.service \
    etc/reuseportd/reuseportd.toml \
    usr/share/man/man8/reuseportd.8.gz usr/share/man/man8/reuseportctl.8.gz \
    usr/share/bash-completion/completions/reuseportd usr/share/bash-completion/completions/reuseportctl \
    usr/share/zsh/vendor-completions/_reuseportd usr/share/zsh/vendor-completions/_reuseportctl \
    usr/share/fish/vendor_completions.d/reuseportd.fish usr/share/fish/vendor_completions.d/reuseportctl.fish \
    usr/share/doc/reuseportd/README.md usr/share/doc/reuseportd/operations.md \
    usr/share/doc/reuseportd/configuration.md usr/share/doc/reuseportd/copyright \
    usr/share/doc/reuseportd/changelog.Debian.gz \
    usr/share/doc/reuseportd/examples/worker.c usr/share/doc/reuseportd/examples/worker.py \
    usr/share/doc/reuseportd/examples/worker.go usr/share/doc/reuseportd/examples/quic.toml \
    usr/share/doc/reuseportd/cli.md usr/share/doc/reuseportd/quic.md usr/share/doc/reuseportd/fuzzing.md \
    usr/share/doc/reuseportd/architecture.md usr/share/doc/reuseportd/kernel-support.md \
    usr/share/doc/reuseportd/benchmarks.md usr/share/doc/reuseportd/benchmarks.png \
    usr/lib/reuseportd/libreuseportd-preload.so; do
    check "file /$file, root/root" has_file "$file"
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb --extract "$deb" "$root"
check "every relative link in the installed docs resolves (file and #heading)" \
    "$(dirname "$0")/check-doc-links.py" "$root" /usr/share/doc/reuseportd
{ "$(dirname "$0")/check-doc-links.py" "$root" /usr/share/doc/reuseportd || true; } | sed 's/^/          /'
# ldd refuses a static executable ("not a dynamic executable").
check "reuseportd is statically linked" bash -c '! ldd "$0"' "$root/usr/bin/reuseportd"
check "reuseportctl needs no Swift library, finds every other" \
    bash -c 'ldd "$0" | grep -qv swift && ! ldd "$0" | grep -Eq "not found|libswift|libFoundation"' "$root/usr/bin/reuseportctl"
# Every shared library reuseportctl names (NEEDED) is in a package Depends: names.
check "every library reuseportctl needs is in a package Depends: names" \
    bash -c 'depends=$(sed -n "s/^ Depends: //p" <<<"$1" | tr "," "\n" | sed "s/^ *//; s/ .*//");
        for lib in $(readelf -d "$0" | sed -n "s/.*NEEDED.*\[\(.*\)\]/\1/p"); do
            package=$(dpkg -S "*/$lib" 2>/dev/null | grep -v "^diversion" | head -1 | cut -d: -f1);
            [ -n "$package" ] && grep -qx "$package" <<<"$depends" || { echo "$lib ($package)"; exit 1; };
        done' "$root/usr/bin/reuseportctl" "$info"
# The binaries were built with the version the package is named with (the Makefile's DEB_VERSION).
version=$(sed -n 's/^ Version: //p' <<<"$info")
for binary in reuseportd reuseportctl; do
    check "$binary --help runs" "$root/usr/bin/$binary" --help
    check "$binary --version is the package's Version ($version)" \
        bash -c '[ "$("$0" --version)" = "$1" ]' "$root/usr/bin/$binary" "$version"
done
check "the shipped configuration passes --check" \
    "$root/usr/bin/reuseportd" --config "$root/etc/reuseportd/reuseportd.toml" --check
# preload_bind: the installed daemon finds the bind preload library beside its bin/ folder
# (lib/reuseportd/), which --check requires to exist and be root's. /bin/true stands for a
# dynamically linked server.
printf '[[service]]\nname = "selfbind"\nlisten = ["udp://127.0.0.1:0"]\nworkers = 1\nexec = ["/bin/true"]\npreload_bind = true\n' \
    >"$root/preload.toml"
check "a preload_bind service passes --check (the library found in /usr/lib/reuseportd)" \
    env -u REUSEPORTD_PRELOAD_LIBRARY "$root/usr/bin/reuseportd" --config "$root/preload.toml" --check
check "the bind preload library is a shared object that loads" \
    env LD_PRELOAD="$root/usr/lib/reuseportd/libreuseportd-preload.so" /bin/true
check "reuseportd.service runs /usr/bin/reuseportd with /etc/reuseportd/reuseportd.toml" \
    grep -q '^ExecStart=/usr/bin/reuseportd --config /etc/reuseportd/reuseportd.toml ' \
    "$root/usr/lib/systemd/system/reuseportd.service"
check "reuseportd.service is Type=notify-reload with a watchdog" \
    bash -c 'grep -q "^Type=notify-reload" "$0" && grep -q "^WatchdogSec=" "$0"' \
    "$root/usr/lib/systemd/system/reuseportd.service"
check "reuseportd-metrics.service runs /usr/bin/reuseportctl" \
    grep -q '^ExecStart=/usr/bin/reuseportctl ' "$root/usr/lib/systemd/system/reuseportd-metrics.service"
for page in reuseportd reuseportctl; do
    check "man page $page(8) renders with its NAME" \
        bash -c 'zcat "$0" | MANWIDTH=80 man -l - 2>/dev/null | grep -q "^NAME"' "$root/usr/share/man/man8/$page.8.gz"
done
# EXIT STATUS lists what each status means (dist/man/*.exit-status), not "exits 0 on success, >0 if an
# error occurs"; the internal subcommands are left out; the docs the pages name are installed.
check "reuseportd(8): EXIT STATUS explains 0, 1, 2 and 64" \
    bash -c 'zcat "$0" | MANWIDTH=200 man -l - 2>/dev/null | sed -n "/^EXIT STATUS/,/^[A-Z]/p" |
        grep -Eq "^ +64 +A bad command line" ' "$root/usr/share/man/man8/reuseportd.8.gz"
check "reuseportctl(8): EXIT STATUS explains 0, 1 and 2" \
    bash -c 'zcat "$0" | MANWIDTH=200 man -l - 2>/dev/null | sed -n "/^EXIT STATUS/,/^[A-Z]/p" |
        grep -Eq "^ +2 +Bad arguments" ' "$root/usr/share/man/man8/reuseportctl.8.gz"
check "reuseportd(8) lists neither exec-worker nor check-config" \
    bash -c '! zcat "$0" | grep -Eq "exec-worker|check-config"' "$root/usr/share/man/man8/reuseportd.8.gz"
check "the docs folder reuseportd(8) names is installed" \
    bash -c 'zcat "$0" | grep -q "/usr/share/doc/reuseportd/" && [ -f "$1/usr/share/doc/reuseportd/configuration.md" ]' \
    "$root/usr/share/man/man8/reuseportd.8.gz" "$root"
check "bash completion parses" bash -n "$root/usr/share/bash-completion/completions/reuseportctl"

echo "$passed passed, $failed failed"
if command -v lintian >/dev/null; then
    echo "    lintian (not fatal):"
    lintian --no-tag-display-limit "$deb" 2>&1 | sed 's/^/      /' || true
else
    echo "    lintian: not installed, skipped"
fi
[ "$failed" = 0 ]
