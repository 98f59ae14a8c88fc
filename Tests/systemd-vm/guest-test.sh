#!/bin/bash
# Runs inside the systemd VM (Tests/systemd-vm/run.sh) as a service once the system is up:
# installs the package, then drives reuseportd through systemctl as an operator would, and reports
# each check on the serial console as "CHECK <name> PASS|FAIL <detail>" for run.sh to read. Powers
# the VM off at the end.
exec >/dev/ttyS0 2>&1
echo "SYSTEMD-VM-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "SYSTEMD $(systemctl --version | head -n1)"
echo "KERNEL $(uname -r)"

passed=0
failed=0
# check NAME DETAIL COMMAND...: PASS when COMMAND succeeds.
check() {
    local name=$1 detail=$2
    shift 2
    if "$@"; then
        passed=$((passed + 1))
        echo "CHECK $name PASS $detail"
    else
        failed=$((failed + 1))
        echo "CHECK $name FAIL $detail"
    fi
}
prop() { systemctl show -P "$1" reuseportd.service; }
# Slots with a running worker, as the pins say (reuseportctl reads rp_slot_state).
# What map dump said on stderr last time (named in a failed check).
running() { reuseportctl map dump 2>/tmp/map-dump.err | grep -cw running; }
dump_error() { head -c 400 /tmp/map-dump.err 2>/dev/null | tr '\n' ' '; }
# Slots the service has (each with its socket and worker): a scale is a placement change that
# adds the new slots at once and switches their buckets once the live flows are recorded, so
# slot_count (the table's) changes only at the switch; the slots listed change at once.
slots() { reuseportctl map dump --json 2>/dev/null | grep -c '"slot" :'; }
# Datagrams answered by a whoami worker, of $1 sent from as many source ports.
answered() {
    local count=0
    for i in $(seq 1 "$1"); do
        socat -t2 -T2 - UDP:127.0.0.1:5300 <<<"flow $i" 2>/dev/null | grep -q '^slot=' && count=$((count + 1))
    done
    echo "$count"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# The slot and pid that answer each of 64 flows, flow i from source port $1 + i: "port slot pid"
# lines (a missing answer leaves "port"). All at once: socat waits out its -t after the answer.
flow_slots() {
    local dir pids=()
    dir=$(mktemp -d)
    for i in $(seq 0 63); do
        socat -t3 -T3 - "UDP:127.0.0.1:5300,sourceport=$(($1 + i))" <<<"flow $i" >"$dir/$i" 2>/dev/null &
        pids+=($!)
    done
    wait "${pids[@]}"
    for i in $(seq 0 63); do
        echo "$(($1 + i)) $(sed -n '1s/^slot=\([0-9]*\) pid=\([0-9]*\).*/\1 \2/p' "$dir/$i")"
    done
    rm -rf "$dir"
}
# Flows of two flow_slots outputs ($1, $2) whose slot differs, or that got no answer.
moved() { paste -d' ' <(echo "$1") <(echo "$2") | awk 'NF != 6 || $2 != $5' | wc -l; }
# Sends 16 datagrams now, from source ports $1 + i, each socat waiting for its answer in
# $burst_dir/<i>, in the background (burst_wait collects them).
burst_send() {
    burst_dir=$(mktemp -d)
    burst_pids=()
    for i in $(seq 0 15); do
        socat -t90 -T90 - "UDP:127.0.0.1:5300,sourceport=$(($1 + i))" <<<"sent while down $i" >"$burst_dir/$i" 2>/dev/null &
        burst_pids+=($!)
    done
}
# How many of the burst were answered, waiting up to $1 s; then ends its socats.
burst_wait() {
    local deadline=$(($(now_ms) + $1 * 1000)) count=0
    while :; do
        count=$(cat "$burst_dir"/* | grep -c '^slot=')
        if [ "$count" = 16 ] || [ "$(now_ms)" -gt "$deadline" ]; then break; fi
        sleep 0.2
    done
    kill "${burst_pids[@]}" 2>/dev/null
    wait "${burst_pids[@]}" 2>/dev/null
    rm -rf "$burst_dir"
    echo "$count"
}
workers() { pgrep -c -f 'reuseportd exec-worker'; }
# Waits until the daemon $1 is gone and no worker runs (at most 30 s).
wait_down() {
    local deadline=$(($(now_ms) + 30000))
    while { kill -0 "$1" 2>/dev/null || [ "$(workers)" != 0 ]; } && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
}
# Waits until the unit is active again with a main pid other than $1 (at most 60 s).
wait_up() {
    local deadline=$(($(now_ms) + 60000))
    while { [ "$(prop ActiveState)" != active ] || [ "$(prop MainPID)" = "$1" ]; } && [ "$(now_ms)" -lt "$deadline" ]; do
        sleep 0.2
    done
}
# Runs the command after $1 that takes the daemon $main_pid down, sends a burst (burst_send $1)
# once it and its workers are gone, and waits for the next daemon: sets at_burst (workers running
# when the burst began and when it was sent: under TCG starting 16 socats takes a while, and the
# next daemon may start meanwhile), took (ms until active again) and late (the burst's answers).
outage() {
    local first_port=$1 start
    shift
    start=$(now_ms)
    "$@"
    wait_down "$main_pid"
    at_burst=$(workers)
    burst_send "$first_port"
    at_burst="$at_burst then $(workers)"
    wait_up "$main_pid"
    took=$(($(now_ms) - start))
    late=$(burst_wait 30)
}
config() {
    cat >/etc/reuseportd/reuseportd.toml <<EOF
[[service]]
name = "demo"
listen = ["udp://127.0.0.1:5300"]
workers = $1
builtin = "whoami"
user = "nobody"
group = "nogroup"
ready_after_ms = 2000
flow_idle_timeout_ms = 3000
EOF
}
finish() {
    if [ "$failed" != 0 ]; then
        echo "--- journalctl -u reuseportd (the last 80 lines), for the failures above"
        journalctl -u reuseportd --no-pager -n 80 -o short-monotonic | sed 's/^/JOURNAL /'
    fi
    echo "$passed passed, $failed failed"
    echo "SYSTEMD-VM-END status=$([ "$failed" = 0 ] && echo 0 || echo 1) uptime=$(cut -d' ' -f1 /proc/uptime)"
    sync
    systemctl poweroff --force --force
}

# 1. Install the package the way a Debian user does: postinst has systemd load the units.
dpkg -i /root/reuseportd.deb >/tmp/dpkg.log 2>&1
check dpkg-install "$(tail -n1 /tmp/dpkg.log)" test $? = 0
check unit-loaded "LoadState=$(prop LoadState) UnitFileState=$(prop UnitFileState)" test "$(prop LoadState)" = loaded
check conffile "$(dpkg-query -W -f='${Conffiles}' reuseportd | xargs)" \
    bash -c 'dpkg-query -W -f="\${Conffiles}" reuseportd | grep -q /etc/reuseportd/reuseportd.toml'
# The man pages as a user reads them: EXIT STATUS says what each status means (not "exits 0 on
# success, >0 if an error occurs"), and the internal subcommands are not listed.
# Each page is rendered once, and the check reads what the detail shows.
# The EXIT STATUS section with runs of blanks squeezed: groff justifies a filled line by widening
# the gaps between its words ("Bad  arguments:  an  unknown"), wherever the line happens to break.
exit_status() { MANWIDTH=120 man "$1" 2>/dev/null | sed -n '/^EXIT STATUS/,/^[A-Z]/p' | tr -s ' '; }
summary() { grep -E '^ [0-9]+ ' <<<"$1" | tr '\n' ' ' | cut -c1-160; }
daemon_status=$(exit_status reuseportd)
check man-reuseportd-exit-status "$(summary "$daemon_status")" grep -Eq "^ 64 A bad command line" <<<"$daemon_status"
ctl_status=$(exit_status reuseportctl)
check man-reuseportctl-exit-status "$(summary "$ctl_status")" grep -Eq "^ 2 Bad arguments" <<<"$ctl_status"
check man-no-internal-commands "$(man reuseportd 2>/dev/null | grep -cE 'exec-worker|check-config') mentions" \
    bash -c '! man reuseportd 2>/dev/null | grep -qE "exec-worker|check-config"'
check docs-installed "$(ls /usr/share/doc/reuseportd | xargs)" \
    bash -c 'cd /usr/share/doc/reuseportd && test -f quic.md -a -f fuzzing.md -a -f cli.md -a -f configuration.md -a -f examples/worker.py'

# Workers count as running after ready_after_ms = 2000: READY=1 cannot come before that. A short
# watchdog period for the test, and a short abort timeout (a stopped daemon cannot act on SIGABRT).
config 4
mkdir -p /etc/systemd/system/reuseportd.service.d
printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\nTimeoutStartSec=40s\n' >/etc/systemd/system/reuseportd.service.d/test.conf
# systemd before 253 has no Type=notify-reload: the drop-in docs/operations.md gives for it.
systemd_version=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
if [ "$systemd_version" -lt 253 ]; then
    printf '[Service]\nType=notify\nExecReload=/bin/kill -HUP $MAINPID\nEnvironment=FDSTORE=4096\n' \
        >/etc/systemd/system/reuseportd.service.d/before-253.conf
fi
# Sockets in the fd store; systemd before 254 does not say (no NFileDescriptorStore): $1, what
# the check expects, stands in for it there.
fdstore() { if [ "$systemd_version" -ge 254 ]; then prop NFileDescriptorStore; else echo "$1 (systemd $systemd_version: not reported)"; fi; }
systemctl daemon-reload

# 2. start: activating until READY=1, which comes only with every worker running.
start=$(now_ms)
systemctl start --no-block reuseportd
seen_activating=0
partial_while_activating=0
# systemctl only, a round every 0.1 s (reuseportctl, 60 MB, takes seconds to start under TCG):
# while activating, the daemon's STATUS= says how many run.
while :; do
    state=$(prop ActiveState)
    status=$(prop StatusText)
    if [ "$state" = activating ]; then
        seen_activating=1
        [[ "$status" == *"/4 workers running"* && "$status" != *"4/4 workers running"* ]] && partial_while_activating=1
    elif [ "$state" = active ]; then
        workers_at_active=$(running)
        break
    elif [ "$state" = failed ] || [ "$state" = deactivating ] || [ $(($(now_ms) - start)) -gt 60000 ]; then
        workers_at_active="none ($state)"
        break
    fi
    sleep 0.1
done
took=$(($(now_ms) - start))
check start-activating-until-ready "activating seen=$seen_activating, with STATUS= fewer than 4/4 running=$partial_while_activating" \
    test "$seen_activating$partial_while_activating" = 11
check start-active-with-every-worker "running at active: $workers_at_active of 4, after $took ms $(dump_error)" \
    test "$workers_at_active" = 4
check start-after-ready-after-ms "$took ms >= 2000" test "$took" -ge 2000
status_text=$(prop StatusText)
check status-text "StatusText=$status_text" test "$status_text" = "1 service, 4/4 workers running"
check systemctl-status-shows-status "$(systemctl status reuseportd --no-pager | grep 'Status:' | xargs)" \
    bash -c 'systemctl status reuseportd --no-pager | grep -q "Status: \"1 service, 4/4 workers running\""'
check answers "$(answered 16) of 16 datagrams answered" test "$(answered 16)" = 16
main_pid=$(prop MainPID)
# Nothing below means anything without a running daemon.
[ "$workers_at_active" = 4 ] || finish

# 3. reload: systemctl reload returns once the new configuration is applied (RELOADING=1 then READY=1).
config 6
start=$(now_ms)
systemctl reload reuseportd
reload_rc=$?
slots_after=$(slots)
if [ "$systemd_version" -lt 253 ]; then
    # With Type=notify, `systemctl reload` returns once kill has run, not once the reload is done.
    waited=0
    while [ "$slots_after" != 6 ] && [ "$waited" -lt 20 ]; do sleep 0.5; waited=$((waited + 1)); slots_after=$(slots); done
    slots_after="$slots_after (systemd $systemd_version: $waited waits of 0.5 s after reload returned)"
fi
check reload-applied "systemctl reload: status $reload_rc after $(($(now_ms) - start)) ms; slots right after: $slots_after" \
    test "$reload_rc${slots_after%% *}" = 06
check reload-active-same-pid "ActiveState=$(prop ActiveState) MainPID=$(prop MainPID) (was $main_pid)" \
    test "$(prop ActiveState)$(prop MainPID)" = "active$main_pid"
check reload-status "StatusText=$(prop StatusText)" bash -c '[[ "$0" == *"last: reloaded: demo: 6 workers"* ]]' "$(prop StatusText)"
printf '[[service]\n' >/etc/reuseportd/reuseportd.toml
systemctl reload reuseportd
refused_rc=$?
[ "$systemd_version" -lt 253 ] && sleep 3
check reload-refused-still-active "systemctl reload: status $refused_rc, ActiveState=$(prop ActiveState), slots $(slots)" \
    test "$(prop ActiveState)$(slots)" = active6
check reload-refused-status "StatusText=$(prop StatusText)" \
    bash -c '[[ "$0" == *"last: reload refused: the configuration is invalid"* ]]' "$(prop StatusText)"
config 6

# 4. The watchdog (WatchdogSec=2s): a daemon that pings is left alone for 3.5 periods...
sleep 7
check watchdog-quiet "WatchdogUSec=$(prop WatchdogUSec) NRestarts=$(prop NRestarts) MainPID=$(prop MainPID) (was $main_pid)" \
    test "$(prop NRestarts)$(prop MainPID)" = "0$main_pid"
# ... and one stopped with SIGSTOP is restarted by it.
kill -STOP "$main_pid"
start=$(now_ms)
while [ "$(prop NRestarts)" = 0 ] && [ $(($(now_ms) - start)) -lt 30000 ]; do sleep 0.2; done
while [ "$(prop ActiveState)" != active ] && [ $(($(now_ms) - start)) -lt 60000 ]; do sleep 0.2; done
check watchdog-restarts-stopped-daemon \
    "NRestarts=$(prop NRestarts) Result=$(prop Result) ActiveState=$(prop ActiveState) MainPID=$(prop MainPID) (was $main_pid) after $(($(now_ms) - start)) ms; running $(running)" \
    test "$(prop NRestarts)$(prop ActiveState)$(running)" = 1active6
check answers-after-watchdog "$(answered 16) of 16 datagrams answered" test "$(answered 16)" = 16

# 5. The journal: priorities from the <N> prefixes, no timestamp of the daemon's own.
check journal-priorities "notice lines: $(journalctl -u reuseportd -p notice..notice -o cat --no-pager | grep -c .)" \
    bash -c 'journalctl -u reuseportd -p notice..notice -o cat --no-pager | grep -q "every worker is running" &&
        journalctl -u reuseportd -p info..info -o cat --no-pager | grep -q "worker started" &&
        ! journalctl -u reuseportd -p info..info -o cat --no-pager | grep -q "every worker is running"'
check journal-no-own-timestamp "$(journalctl -u reuseportd -o cat --no-pager | grep -c '^20[0-9][0-9]-') lines start with a date" \
    bash -c '! journalctl -u reuseportd -o cat --no-pager | grep -q "^20[0-9][0-9]-"'

# 6. The fd store (FileDescriptorStoreMax=): systemd keeps every slot's socket while no daemon
# runs. The scale of the reload has switched by now (3 s of learning): no change is pending.
deadline=$(($(now_ms) + 30000))
until reuseportctl map dump --json 2>/dev/null | grep -q '"phase" : "none"' || [ "$(now_ms)" -gt "$deadline" ]; do sleep 0.5; done
check fdstore-every-socket "NFileDescriptorStore=$(fdstore 7) for 6 slots of 1 listener and its socket array" \
    test "$(fdstore 7 | cut -d' ' -f1)" = 7
before=$(flow_slots 40000)
check fdstore-flows-answered "$(moved "$before" "$before") of 64 flows unanswered" test "$(moved "$before" "$before")" = 0

# systemctl restart: the workers stop with the daemon, the sockets stay in the store; what is sent
# while no daemon runs queues in them, and the next daemon's workers, on the same slots, answer it.
main_pid=$(prop MainPID)
outage 41000 systemctl restart --no-block reuseportd
after=$(flow_slots 40000)
check restart-serves "ActiveState=$(prop ActiveState) MainPID=$(prop MainPID) (was $main_pid), running $(running) after $took ms" \
    test "$(prop ActiveState)$(running)" = active6
check restart-sent-while-down-answered "$late of 16 datagrams answered after the restart; workers running as the burst began, then as it ended: $at_burst" \
    test "$late ${at_burst%% *}" = "16 0"
check restart-no-flow-moved "$(moved "$before" "$after") of 64 flows changed slot; worker pids before: $(echo "$before" | awk '{print $3}' | sort -u | xargs); after: $(echo "$after" | awk '{print $3}' | sort -u | xargs)" \
    test "$(moved "$before" "$after")" = 0
reuse_line() { journalctl -u reuseportd -o cat --no-pager _PID="$(prop MainPID)" | grep -o 'fd store: [0-9]* sockets reused.*' | tail -n1; }
arrays_line() { journalctl -u reuseportd -o cat --no-pager _PID="$(prop MainPID)" | grep -c 'took over its stored socket arrays'; }
check restart-store-kept "NFileDescriptorStore=$(fdstore 7); $(reuse_line); arrays taken over: $(arrays_line)" \
    bash -c '[ "$0" = 7 ] && [[ "$1" == "fd store: 6 sockets reused, 0 refused"* ]] && [ "$2" = 1 ]' "$(fdstore 7 | cut -d' ' -f1)" "$(reuse_line)" "$(arrays_line)"

# SIGKILL to the daemon alone: systemd restarts it (Restart=on-failure, RestartSec=1 s) with the
# stored sockets; it serves again with no flow moved, and what arrived meanwhile is answered.
main_pid=$(prop MainPID)
restarts=$(prop NRestarts)
outage 42000 systemctl kill -s SIGKILL --kill-whom=main reuseportd
killed=$(flow_slots 40000)
check sigkill-restarted "NRestarts=$(prop NRestarts) (was $restarts) ActiveState=$(prop ActiveState) MainPID=$(prop MainPID) (was $main_pid), running $(running) after $took ms" \
    test "$(prop NRestarts)$(prop ActiveState)$(running)" = "$((restarts + 1))active6"
check sigkill-sent-while-down-answered "$late of 16 datagrams answered after the restart; workers running as the burst began, then as it ended: $at_burst" \
    test "$late ${at_burst%% *}" = "16 0"
check sigkill-no-flow-moved "$(moved "$before" "$killed") of 64 flows changed slot" test "$(moved "$before" "$killed")" = 0
check sigkill-store-kept "NFileDescriptorStore=$(fdstore 7); $(reuse_line); arrays taken over: $(arrays_line)" \
    bash -c '[ "$0" = 7 ] && [[ "$1" == "fd store: 6 sockets reused, 0 refused"* ]] && [ "$2" = 1 ]' "$(fdstore 7 | cut -d' ' -f1)" "$(reuse_line)" "$(arrays_line)"

# reuseportctl daemon reexec: the daemon execs its binary in place; systemd's main PID stays, and
# the new image adopts the same workers (slot and pid), so no flow changes worker.
main_pid=$(prop MainPID)
restarts=$(prop NRestarts)
before_reexec=$(flow_slots 43000)
reexec_out=$(reuseportctl daemon reexec 2>&1 | tail -n1)
after_reexec=$(flow_slots 43000)
changed_worker=$(paste -d' ' <(echo "$before_reexec") <(echo "$after_reexec") | awk 'NF != 6 || $2 != $5 || $3 != $6' | wc -l)
check reexec-same-main-pid "$reexec_out; MainPID=$(prop MainPID) (was $main_pid) NRestarts=$(prop NRestarts) (was $restarts) ActiveState=$(prop ActiveState)" \
    test "$(prop MainPID) $(prop NRestarts) $(prop ActiveState)" = "$main_pid $restarts active"
check reexec-same-workers "$changed_worker of 64 flows changed worker (slot or pid); pids: $(echo "$after_reexec" | awk '{print $3}' | sort -u | xargs)" \
    test "$changed_worker" = 0

# 7. stop: every worker, socket and pin goes; the daemon exits 0; systemd empties the store.
systemctl stop reuseportd
check stop-inactive "ActiveState=$(prop ActiveState) Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus)" \
    test "$(prop ActiveState)$(prop Result)$(prop ExecMainStatus)" = inactivesuccess0
check stop-store-empty "NFileDescriptorStore=$(fdstore 0)" test "$(fdstore 0 | cut -d' ' -f1)" = 0
left=$(pgrep -c -x reuseportd)
check stop-no-process-left "processes named reuseportd: $left" test "$left" = 0
check stop-pins-removed "$(ls /sys/fs/bpf/reuseportd 2>&1 | xargs)" test ! -e /sys/fs/bpf/reuseportd/demo
check stop-graceful "$(journalctl -u reuseportd -o cat --no-pager | grep -c 'SIGTERM: stopping') SIGTERM lines" \
    bash -c 'journalctl -u reuseportd -o cat --no-pager | grep -q "SIGTERM: stopping"'

# 8. start after a stop: nothing stored is left, so new sockets, stored in turn.
systemctl start reuseportd
passed_line() { journalctl -u reuseportd -o cat --no-pager _PID="$(prop MainPID)" | grep -c 'descriptors passed'; }
check start-after-stop "ActiveState=$(prop ActiveState), running $(running), NFileDescriptorStore=$(fdstore 7), lines about descriptors passed: $(passed_line)" \
    test "$(prop ActiveState)$(running)$(fdstore 7 | cut -d' ' -f1)$(passed_line)" = active670
check answers-after-start "$(answered 16) of 16 datagrams answered" test "$(answered 16)" = 16
systemctl stop reuseportd

finish
