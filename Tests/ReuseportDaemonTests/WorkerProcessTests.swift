#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport
import Testing

/// What a worker forks is the daemon's to stop, with the worker: when the worker exits by
/// itself, and when the daemon stops. Nothing may be left holding a slot's socket.
@Suite(.serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct WorkerProcessTests {
    /// A worker forks 10 `sleep` helpers and exits after a second, again and again. The helpers
    /// of an exited worker are stopped before they pile up (each worker start has its own
    /// 10 at most), the daemon keeps no pipe of a dead worker open, and after a clean stop no
    /// helper is left and nothing holds the port.
    @Test func whatAWorkerForksIsStoppedWithIt() throws {
        // A sleep duration nothing else on the machine uses: the helpers are found by it.
        let marker = "300.\(Int.random(in: 100_000...999_999))"
        let script = "for i in 1 2 3 4 5 6 7 8 9 10; do sleep \(marker) & done; sleep 1; exit 0"
        let daemon = try TestDaemon(config: serviceTable(
            "forks", workers: 1, program: "exec = [\"/bin/sh\", \"-c\", \"\(script)\"]",
            extra: "ready_after_ms = 200\nrestart_backoff_max_ms = 300"))
        let port = try udpEndpoint(try daemon.waitForWorkers(), "forks").port

        // Let several workers start and exit; sample the helpers alive and the daemon's fds.
        var mostHelpers = 0
        var fdCounts: [Int] = []
        for sample in 0..<40 {
            sleepMs(150)
            mostHelpers = max(mostHelpers, processes(running: marker).count)
            if sample % 10 == 9 { fdCounts.append(openDescriptors(of: daemon.pid)) }
        }
        let restarts = try #require(try daemon.status().first?.slots.first?.restarts)
        #expect(restarts >= 3, "the worker exits every second: several restarts in 6 s")
        // One worker start's 10, plus at most a few of the previous one's not yet gone.
        #expect(mostHelpers <= 15, "helpers of exited workers pile up: \(mostHelpers) alive at once")
        #expect(fdCounts.max()! - fdCounts.min()! <= 1, "the daemon's descriptors grow with restarts: \(fdCounts)")

        #expect(daemon.stop() == 0)
        #expect(processes(running: marker).isEmpty, "helpers left after a clean stop: \(processes(running: marker))")
        // Nothing holds the port: a socket without SO_REUSEPORT may bind it.
        let probe = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "probe")
        #expect(throws: Never.self) { try Syscall.bind(probe.fd, SocketAddress(.loopbackV4, port), "probe") }
    }

    /// The pids whose command line has `argument`.
    func processes(running argument: String) -> [pid_t] {
        Syscall.directoryEntries("/proc").compactMap { pid_t($0) }.filter { pid in
            guard let bytes = try? Syscall.readFile("/proc/\(pid)/cmdline") else { return false }
            return bytes.split(separator: 0).contains { String(decoding: $0, as: UTF8.self) == argument }
        }
    }

    func openDescriptors(of pid: pid_t) -> Int { Syscall.directoryEntries("/proc/\(pid)/fd").count }
}
