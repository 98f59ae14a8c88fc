#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// What a worker forks is the daemon's to stop, with the worker: when the worker exits by
/// itself, and when the daemon stops. Nothing may be left holding a slot's socket.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
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
            // The fewest of a few readings: a worker start caught half way holds its pipes and
            // spawn descriptors for a moment (one full run saw 41, 47, 42); what grows with
            // restarts stays.
            if sample % 10 == 9 {
                fdCounts.append((0..<5).map { _ in sleepMs(10); return openDescriptors(of: daemon.pid) }.min()!)
            }
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

    /// A worker is created inside its own cgroup: the program's first look at /proc/self/cgroup
    /// already shows `reuseportd-<daemon pid>/<service>.<slot>.<start>`.
    ///
    /// Not under `make test-least-privilege`: there the daemon has no CAP_DAC_OVERRIDE, and where
    /// the cgroup it starts in is not its own to write (this machine's root cgroup is mode 0555)
    /// it falls back to process groups, as documented. With the documented capabilities in a
    /// delegated cgroup, PrivilegeTests.theDocumentedCapabilitiesAreEnough checks the same.
    @Test(.enabled(if: WorkerCgroups.cgroup2Mount() != nil, "no cgroup v2 mounted: workers have no cgroup"),
          .enabled(if: TestDaemon.defaultLauncher.isEmpty, "daemons run under REUSEPORT_TEST_LAUNCHER"))
    func aWorkerStartsInItsCgroup() throws {
        let folder = try TemporaryDirectory()
        let report = "\(folder.path)/cgroup"
        let daemon = try TestDaemon(config: serviceTable(
            "incgroup", workers: 1,
            program: "exec = [\"/bin/sh\", \"-c\", \"cat /proc/self/cgroup > \(report).part; mv \(report).part \(report); exec sleep 60\"]"))
        _ = try daemon.waitForWorkers()
        let deadline = nowMs() + 5000
        while access(report, F_OK) != 0 && nowMs() < deadline { sleepMs(20) }
        let text = try String(contentsOfFile: report, encoding: .utf8)
        let line = text.split(separator: "\n").first { $0.hasPrefix("0::") }
        #expect(line?.hasSuffix("/reuseportd-\(daemon.pid)/incgroup.0.1") == true, "the worker's cgroups: \(text)")
        #expect(daemon.stop() == 0)
    }

    /// ProcessSpawn with a cgroup: the program (cat, which joins nothing) runs in it from its
    /// first instruction, in a process group of its own; a failed exec throws the exact errno
    /// and names execve.
    @Test(.enabled(if: WorkerCgroups.cgroup2Mount() != nil, "no cgroup v2 mounted"))
    func processSpawnCreatesTheChildInsideTheCgroup() throws {
        let mount = try #require(WorkerCgroups.cgroup2Mount())
        let own = try #require(WorkerCgroups.ownCgroup())
        let relative = "\(own == "/" ? "" : own)/rpd-spawn-test-\(getpid())"
        try Syscall.makeDirectory(mount + relative)
        defer { _ = try? Syscall.removeDirectory(mount + relative) }
        let cgroup = try Syscall.open(mount + relative, O_RDONLY | O_DIRECTORY)

        let output = try Syscall.pipe()
        let script = "cat /proc/self/cgroup; cut -d' ' -f5 /proc/$$/stat"
        let pid = try ProcessSpawn(path: "/bin/sh", arguments: ["sh", "-c", script],
                                   fileActions: [.nullInput, .duplicate(output.write.fd.rawValue, to: 1), .closeFrom(3)],
                                   newProcessGroup: true, resetSignals: true, cgroup: cgroup.fd).start()
        output.write.close()
        let lines = String(decoding: try Syscall.readToEnd(output.read.fd), as: UTF8.self).split(separator: "\n")
        #expect(try Syscall.wait(pid, block: true)?.status == .exited(0))
        #expect(lines.contains { $0 == "0::\(relative)" }, "cgroups of the child: \(lines)")
        #expect(lines.last.map { $0.trimmingCharacters(in: .whitespaces) } == String(pid), "its own process group")

        let missing = "/nonexistent/rpd-program"
        #expect {
            try ProcessSpawn(path: missing, arguments: [missing], cgroup: cgroup.fd).start()
        } throws: { error in
            guard case .system(let call, let code, _) = error as? ReuseportError else { return false }
            return call == "execve(\(missing))" && code == ENOENT
        }
    }

    /// ProcessSpawn with `newSession`, through posix_spawn and through clone3 into a cgroup: the
    /// child leads a session and a process group of its own (workers are started so, and a
    /// process of one cannot join another's group).
    @Test(arguments: ["posix_spawn", "clone3"])
    func processSpawnStartsTheChildInASessionOfItsOwn(_ path: String) throws {
        var cgroup: OwnedDescriptor?
        var folder: String?
        if path == "clone3" {
            guard let mount = WorkerCgroups.cgroup2Mount(), let own = WorkerCgroups.ownCgroup() else {
                print("no cgroup v2 mounted: clone3 into a cgroup is not tried")
                return
            }
            folder = mount + "\(own == "/" ? "" : own)/rpd-session-test-\(getpid())"
            try Syscall.makeDirectory(folder!)
            cgroup = try Syscall.open(folder!, O_RDONLY | O_DIRECTORY)
        }
        defer {
            cgroup?.close()
            if let folder { _ = try? Syscall.removeDirectory(folder) }
        }
        let output = try Syscall.pipe()
        // Fields 5 and 6 of /proc/PID/stat: process group and session.
        let pid = try ProcessSpawn(path: "/bin/sh", arguments: ["sh", "-c", "cut -d' ' -f5,6 /proc/$$/stat"],
                                   fileActions: [.nullInput, .duplicate(output.write.fd.rawValue, to: 1), .closeFrom(3)],
                                   newProcessGroup: true, newSession: true, resetSignals: true, cgroup: cgroup?.fd).start()
        output.write.close()
        let text = String(decoding: try Syscall.readToEnd(output.read.fd), as: UTF8.self)
        #expect(try Syscall.wait(pid, block: true)?.status == .exited(0))
        #expect(text.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid) \(pid)",
                "process group and session of child \(pid): \(text)")
        #expect(getsid(0) != pid, "this process's session is not the child's")
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
