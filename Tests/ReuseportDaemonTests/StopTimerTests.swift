#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The daemon's timers while it stops, with the real daemon binary.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct StopTimerTests {
    /// CPU time (user + system) of a process so far, in milliseconds (/proc/<pid>/stat).
    static func cpuMs(_ pid: pid_t) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.index(after: try #require(stat.lastIndex(of: ")")))...].split(separator: " ")
        // After the command: state is field 3, utime 14 and stime 15 (proc(5)).
        let ticks = try #require(Double(fields[11])) + (try #require(Double(fields[12])))
        return ticks * 1000 / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// A slot is down (its worker was killed and the replacement is not ready yet) when the stop
    /// begins, and a worker that ignores SIGTERM keeps the daemon waiting for the stop timeout. The
    /// slot's failover deadline passes during that wait: no failover happens while stopping, and
    /// the daemon must not spin on that deadline either.
    @Test func aFailoverDeadlineDuringTheStopDoesNotSpin() throws {
        let directory = try TemporaryDirectory()
        let trapped = "\(directory.path)/trapped"
        let daemon = try TestDaemon(config: """
            stop_timeout_ms = 4000
            [[service]]
            name = "stubborn"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            exec = ["/bin/sh", "-c", "trap '' TERM; echo $$ >> \(trapped); while :; do sleep 1; done"]
            ready_after_ms = 60000
            failover_after_ms = 1500
            """)
        /// Waits until `count` workers have set their SIGTERM trap.
        func waitTrapped(_ count: Int) throws {
            let deadline = nowMs() + 30_000
            while ((try? String(contentsOfFile: trapped, encoding: .utf8)) ?? "").split(separator: "\n").count < count {
                guard nowMs() < deadline else { throw HarnessError("no worker set its trap; log:\n\(daemon.log)") }
                sleepMs(10)
            }
        }
        try waitTrapped(1)
        let first = try #require(try daemon.status()[0].slots[0].pid)
        kill(first, SIGKILL)
        let killedAt = nowMs()
        try waitTrapped(2)
        daemon.signal(SIGTERM)
        let before = try StopTimerTests.cpuMs(daemon.pid)
        // The failover deadline passes 1.5 s after the kill; the stop timeout ends 4 s after SIGTERM.
        sleepMs(Int(killedAt + 3500 - nowMs()))
        let spent = try StopTimerTests.cpuMs(daemon.pid) - before
        print("daemon CPU time while waiting for a worker that ignores SIGTERM: \(spent) ms in 3.5 s")
        #expect(spent < 300, "the daemon waits in poll() for the stop timeout; it used \(spent) ms of CPU")
        #expect(daemon.waitForExit(timeoutMs: 20_000) == 0, "it stops once SIGKILL has ended the worker")
    }
}
