#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Workers' notifications (NOTIFY_SOCKET) and systemd's watchdog, per worker, on the real daemon.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct LivenessTests {
    /// A worker that sends READY=1, STATUS= and WATCHDOG=1 every 200 ms for 3 s and then
    /// hangs (alive, silent) is stopped after `watchdog_ms` and replaced; the restart is counted
    /// per slot. While it pings, it is not touched, and it sees WATCHDOG_USEC and its own
    /// WATCHDOG_PID.
    @Test func aWorkerThatStopsPingingIsRestartedAndCounted() throws {
        let script = """
            import os, socket, time
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ok = os.environ.get("WATCHDOG_PID") == str(os.getpid())
            s.sendto(("READY=1\\nSTATUS=pinging usec=%s pid_ok=%d" % (os.environ.get("WATCHDOG_USEC"), ok)).encode(),
                     os.environ["NOTIFY_SOCKET"])
            end = time.monotonic() + 3
            while time.monotonic() < end:
                s.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
                time.sleep(0.2)
            time.sleep(3600)
            """
        let program = "exec = [\"python3\", \"-c\", \(jsonString(script))]"
        let daemon = try TestDaemon(config: "stop_timeout_ms = 1000\n" + serviceTable(
            "dog", workers: 1, program: program, extra: "watchdog_ms = 2000\nready_after_ms = 100"))
        let first = try daemon.waitFor("the worker's READY=1 and STATUS=") { services in
            services[0].slots[0].notifiedReady == true && services[0].slots[0].notifiedStatus != nil
        }[0].slots[0]
        let started = nowMs()
        #expect(first.notifiedStatus == "pinging usec=2000000 pid_ok=1")
        #expect(first.watchdogRestarts == 0)

        let after = try daemon.waitFor("a watchdog restart", timeoutMs: 15_000) { services in
            services[0].slots[0].watchdogRestarts == 1 && services[0].slots[0].pid != first.pid
                && services[0].slots[0].pid != nil
        }[0].slots[0]
        let elapsed = nowMs() - started
        #expect(elapsed >= 3000, "the watchdog fired only after the pings stopped (\(elapsed) ms)")
        #expect(after.restarts >= 1)
        #expect(daemon.log.contains("sent no WATCHDOG=1 for 2000 ms: SIGABRT"), "\(daemon.logTail())")
        let ready = try daemon.waitFor("the replacement's READY=1") { $0[0].slots[0].notifiedReady == true }
        #expect(ready[0].slots[0].watchdogRestarts == 1, "the replacement pings: no second restart yet")
        #expect(daemon.stop() == 0)
    }

    /// A worker cannot speak for another slot. Slot 1's worker never says READY=1; slot 0's worker
    /// forks a child that tries to join slot 1's process group (setpgid(0, <slot 1's pid>), which
    /// works between process groups of one session) and then sends READY=1 and a STATUS=. The
    /// child is still slot 0's (its cgroup, or the process group it could not leave): slot 1 must
    /// stay not ready, without that STATUS=, and slot 0 takes the STATUS= as its own.
    /// Run twice: with cgroup v2 (each worker has a cgroup, which alone names the sender) and
    /// with the daemon in a mount namespace without it (the process group names the sender, and
    /// each worker's session of its own keeps the child out of slot 1's group).
    @Test(arguments: ["cgroup", "process group"])
    func aWorkersChildCannotNotifyForAnotherSlot(_ tracking: String) throws {
        let withCgroups = tracking == "cgroup"
        if withCgroups, WorkerCgroups.cgroup2Mount() == nil {
            print("no cgroup v2 mounted: the cgroup case runs as the process-group one")
        }
        let folder = try TemporaryDirectory()
        let script = """
            import errno, os, socket, time
            path = os.environ["NOTIFY_SOCKET"]
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if os.environ["REUSEPORT_SLOT"] != "0":
                time.sleep(3600)
            s.sendto(b"READY=1\\nSTATUS=slot 0 itself", path)
            while not os.path.exists("\(folder.path)/victim"):
                time.sleep(0.05)
            victim = int(open("\(folder.path)/victim").read())
            if os.fork() == 0:
                try:
                    os.setpgid(0, victim)
                    result = "joined the process group of %d" % victim
                except OSError as e:
                    result = "setpgid refused: %s" % errno.errorcode.get(e.errno, e.errno)
                result += ", session %d, process group %d" % (os.getsid(0), os.getpgid(0))
                s.sendto(b"READY=1\\nSTATUS=forged by slot 0", path)
                with open("\(folder.path)/result.part", "w") as f:
                    f.write(result)
                os.rename("\(folder.path)/result.part", "\(folder.path)/result")
                # Alive: the daemon looks the sender up when it reads the datagram.
                time.sleep(3600)
            time.sleep(3600)
            """
        let daemon = try TestDaemon(config: "stop_timeout_ms = 1000\n" + serviceTable(
            "forge", workers: 2, program: "exec = [\"python3\", \"-c\", \(jsonString(script))]",
            extra: "notify = true\nready_timeout_ms = 120000"),
            launcher: withCgroups ? TestDaemon.defaultLauncher : withoutCgroup2 + TestDaemon.defaultLauncher)
        let started = try daemon.waitFor("slot 0 ready and a worker on slot 1") { services in
            services.first?.slots.count == 2 && services[0].slots[0].notifiedReady == true
                && services[0].slots[1].pid != nil
        }
        if withCgroups, WorkerCgroups.cgroup2Mount() != nil {
            // Under `make test-least-privilege` the daemon may not make the folder (no
            // CAP_DAC_OVERRIDE for a parent owned by another): then it says so and tracks groups.
            let refused = daemon.log.contains("cannot make a cgroup for the workers")
            if refused { print("the daemon cannot make cgroups here: the cgroup case runs as the process-group one") }
            #expect(refused || daemon.log.contains("workers' cgroups under"), "workers have cgroups: \(daemon.logTail(20))")
        } else {
            #expect(daemon.log.contains("no cgroup v2 mounted"), "workers have no cgroup: \(daemon.logTail(20))")
        }
        let victim = try #require(started[0].slots[1].pid)
        #expect(started[0].slots[1].notifiedReady == false && started[0].slots[1].state != "running",
                "slot 1 never said READY=1: \(started[0].slots[1])")
        try folder.write("victim", "\(victim)")

        let deadline = nowMs() + 20_000
        while access("\(folder.path)/result", F_OK) != 0, nowMs() < deadline { sleepMs(20) }
        let result = (try? String(contentsOfFile: "\(folder.path)/result", encoding: .utf8)) ?? "no result"
        // The forged datagram is heard (as slot 0's, after the fix) or taken for slot 1's.
        let after = try daemon.waitFor("the child's STATUS= recorded on some slot (child: \(result))") { services in
            services[0].slots.contains { $0.notifiedStatus == "forged by slot 0" }
        }
        let slots = after[0].slots
        #expect(slots[1].pid == victim, "slot 1's worker is the same: \(slots[1])")
        #expect(slots[1].notifiedReady == false, "slot 1 took the READY=1 of slot 0's child (\(result)): \(slots[1])")
        #expect(slots[1].state != "running", "slot 1 became running on slot 0's child's word (\(result)): \(slots[1])")
        #expect(slots[1].notifiedStatus == nil,
                "slot 1 took the STATUS= of slot 0's child (\(result)): \(slots[1].notifiedStatus ?? "-")")
        #expect(slots[0].notifiedStatus == "forged by slot 0",
                "the child speaks for its own worker, slot 0 (\(result)): \(slots[0].notifiedStatus ?? "-")")
        print("slot 0's child: \(result); slot 1: \(slots[1].state), notifiedReady \(slots[1].notifiedReady.map(String.init) ?? "-")")
        #expect(daemon.stop() == 0, "\(daemon.logTail())")
    }

    /// Workers running as `nobody` with `notify = true` and a watchdog, in a run folder the daemon
    /// makes itself (in a folder everyone may search, as /run): they reach notify.sock, become
    /// ready, and are not restarted by the watchdog. The folder lets nobody through but not list
    /// it, and the control socket in it stays out of nobody's reach. Also with a run folder an
    /// older daemon left behind, mode 0700: the daemon opens it to search.
    @Test(arguments: ["made by the daemon", "left 0700"])
    func workersOfAnotherUserNotifyInARunFolderTheDaemonMade(_ folder: String) throws {
        let parent = try TemporaryDirectory()
        #expect(chmod(parent.path, 0o755) == 0)
        let runDirectory = "\(parent.path)/run"
        if folder == "left 0700" { #expect(mkdir(runDirectory, 0o700) == 0 && chmod(runDirectory, 0o700) == 0) }
        let watchdogMs = 1000
        let daemon = try TestDaemon(config: "stop_timeout_ms = 1000\n" + serviceTable(
            "asnobody", workers: 2, extra: "user = \"nobody\"\nnotify = true\nwatchdog_ms = \(watchdogMs)"),
            runDirectory: runDirectory)
        // Built-in workers send READY=1 once serving and WATCHDOG=1 every 500 ms.
        var slots: [SlotStatus] = []
        let deadline = nowMs() + 20_000
        while nowMs() < deadline {
            if let services = try? daemon.status(), let service = services.first, service.slots.count == 2 {
                slots = service.slots
                if slots.allSatisfy({ $0.notifiedReady == true && $0.state == "running" }) { break }
            }
            sleepMs(50)
        }
        try #require(slots.count == 2 && slots.allSatisfy { $0.notifiedReady == true && $0.state == "running" },
                     "workers of nobody ready within 20 s: \(slots.map { "slot \($0.slot) pid \($0.pid ?? 0) \($0.state) ready \($0.notifiedReady ?? false) watchdog restarts \($0.watchdogRestarts ?? 0)" }); log: \(daemon.logTail(8))")
        let pids = slots.map(\.pid)
        sleepMs(3 * watchdogMs)
        let after = try daemon.status()[0].slots
        #expect(after.map(\.pid) == pids, "no worker was restarted in 3 watchdog periods: \(after)")
        #expect(after.allSatisfy { $0.watchdogRestarts == 0 }, "no watchdog restart: \(after.map(\.watchdogRestarts))")
        for pid in pids.compactMap({ $0 }) {
            let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            #expect(status.contains("\nUid:\t65534\t65534\t65534\t65534"), "worker \(pid) runs as nobody")
        }

        let info = try Syscall.linkStatus(runDirectory)
        #expect(info.st_mode & 0o7777 == 0o711, "run folder mode \(UntrustedPathError.octal(info.st_mode))")
        if folder == "left 0700" {
            #expect(daemon.log.contains("mode 0700 → 0711, so that workers of any user reach notify.sock"),
                    "the change is logged: \(daemon.logTail(20))")
        }
        // As nobody: the folder cannot be listed, the control socket cannot be connected to, and
        // notify.sock can (the workers above did; this is the same check, said plainly).
        let probe = """
            import os, socket
            def attempt(what, f):
                try:
                    f()
                    print(what, "ok")
                except OSError as e:
                    print(what, os.strerror(e.errno))
            attempt("list", lambda: os.listdir("\(runDirectory)"))
            attempt("control", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\(runDirectory)/control.sock"))
            attempt("notify", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).connect("\(runDirectory)/notify.sock"))
            """
        let result = try Subprocess.run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups",
                                                             "--", "/usr/bin/python3", "-c", probe], captureStandardError: true)
        #expect(result.status == .exited(0), "the probe as nobody: \(result.errors)")
        #expect(result.output.split(separator: "\n") == ["list Permission denied", "control Permission denied", "notify ok"],
                "as nobody: \(result.output)")
        #expect(daemon.stop() == 0, "\(daemon.logTail())")
    }

    /// Datagrams that are not notifications (garbage bytes, a line without '=', more than
    /// 4096 bytes) and notifications from a process that is not a worker are ignored and
    /// counted; the daemon and its workers go on.
    @Test func garbageAtTheNotifySocketIsIgnoredAndCounted() throws {
        // Workers that never notify (the built-in ones send READY=1): nothing may mark them ready.
        let daemon = try TestDaemon(config: serviceTable("calm", workers: 2,
                                                         program: "exec = [\"/bin/sh\", \"-c\", \"exec sleep 600\"]"))
        let before = try daemon.waitForWorkers()
        let socket = try Syscall.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), "AF_UNIX")
        defer { socket.close() }
        try Syscall.connect(socket.fd, unixPath: "\(daemon.runDirectory)/notify.sock")
        let datagrams: [[UInt8]] = [[0xff, 0xfe, 0x00, 0x41], Array("no assignment here".utf8),
                                    Array(repeating: 0x41, count: 5000), Array("WATCHDOG=1\nREADY=1".utf8)]
        for datagram in datagrams {
            _ = try datagram.withUnsafeBytes { try Syscall.send(socket.fd, $0, flags: 0) }
        }
        var ignored: IgnoredNotifications?
        let deadline = nowMs() + 10_000
        while nowMs() < deadline {
            ignored = try daemon.request(ControlRequest(command: .status)).ignoredNotifications
            if ignored == IgnoredNotifications(malformed: 2, oversized: 1, notWorker: 1) { break }
            sleepMs(20)
        }
        #expect(ignored == IgnoredNotifications(malformed: 2, oversized: 1, notWorker: 1))
        let after = try daemon.status()
        #expect(after[0].slots.map(\.pid) == before[0].slots.map(\.pid), "no worker was touched")
        #expect(after[0].slots.allSatisfy { $0.notifiedReady == false && $0.state == "running" })
        #expect(daemon.stop() == 0)
    }

    /// The built-in workers speak sd_notify: READY=1 once serving, WATCHDOG=1 at half the
    /// interval. With a watchdog a third of the test's wait, none is restarted, and they answer.
    @Test func builtinWorkersKeepTheirWatchdogFed() throws {
        let daemon = try TestDaemon(config: serviceTable("fed", workers: 2, extra: "watchdog_ms = 1000"))
        let services = try daemon.waitFor("READY=1 from both built-in workers") {
            $0.first?.slots.count == 2 && $0[0].slots.allSatisfy { $0.notifiedReady == true }
        }
        let pids = services[0].slots.map(\.pid)
        sleepMs(3000)
        let after = try daemon.status()
        #expect(after[0].slots.map(\.pid) == pids, "no worker was restarted: \(after[0].slots)")
        #expect(after[0].slots.allSatisfy { $0.watchdogRestarts == 0 })
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let replies = try Whoami.ask([client], to: try udpEndpoint(after, "fed"), attempts: 3, timeoutMs: 2000) { _ in
            Array("fed".utf8)
        }
        #expect(replies.first??.payload == Array("fed".utf8))
        #expect(daemon.stop() == 0)
    }
}

/// A launcher that runs the daemon in a mount namespace of its own without any cgroup v2 mount
/// (bpffs and the rest stay): the daemon finds no cgroup v2 and tracks workers by process group.
let withoutCgroup2 = [
    "/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
    "for m in $(awk '/ - cgroup2 /{print $5}' /proc/self/mountinfo); do umount -l \"$m\" || exit 1; done; exec \"$@\"",
    "sh",
]

/// `text` as a TOML basic string (JSON's escapes, without `\/`, which TOML lacks).
func jsonString(_ text: String) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = .withoutEscapingSlashes
    return String(decoding: try! encoder.encode(text), as: UTF8.self)
}
