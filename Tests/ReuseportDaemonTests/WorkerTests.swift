#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// What a worker gets (sockets, environment, user, output, death with the daemon), the
/// built-in workers over TCP and IPv6, and the control socket's actions.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct WorkerTests {
    /// Each worker runs as `nobody` with its sockets on fd 3 and 4, LISTEN_PID equal to its own
    /// pid, stdin from /dev/null, and its output in the daemon's log marked with its slot.
    @Test func workersGetTheirSocketsTheSystemdWayAsTheConfiguredUser() throws {
        let script = """
            echo "env pid=$$ LISTEN_PID=$LISTEN_PID LISTEN_FDS=$LISTEN_FDS LISTEN_FDNAMES=$LISTEN_FDNAMES \
            slot=$REUSEPORT_SLOT service=$REUSEPORT_SERVICE uid=$(id -u) \
            fd0=$(readlink /proc/$$/fd/0) fd3=$(readlink /proc/$$/fd/3) fd4=$(readlink /proc/$$/fd/4)"
            exec \(TestDaemon.builtBinary) worker whoami
            """
        let daemon = try TestDaemon(config: """
            [[service]]
            name = "env"
            listen = ["udp://[::1]:0", "tcp://[::1]:0"]
            workers = 2
            exec = ["/bin/sh", "-c", '''\(script)''']
            user = "nobody"
            """)
        let services = try daemon.waitForWorkers()
        let slots = services[0].slots
        // The worker's own report of what it got, through its stdout into the daemon's log (which
        // is part of what is tested); its pid, sockets and user are checked in /proc below.
        let lines = daemon.log.split(separator: "\n").filter { $0.contains(" env pid=") }
        #expect(lines.count == 2, "\(daemon.log)")
        for slot in slots {
            let pid = try #require(slot.pid)
            let line = try #require(lines.first { $0.contains("slot=\(slot.slot) [") }, "slot \(slot.slot) logged")
            #expect(line.contains("service=env"), "marked with the service")
            #expect(line.contains("env pid=\(pid) LISTEN_PID=\(pid) LISTEN_FDS=2 LISTEN_FDNAMES=listener0:listener1 "
                + "slot=\(slot.slot) service=env uid=65534 fd0=/dev/null fd3=socket:"), "\(line)")
            #expect(line.contains("fd4=socket:"), "\(line)")
            // No other socket leaks into the worker (everything the daemon holds is close-on-exec).
            let sockets = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").filter {
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)"))?.hasPrefix("socket:") == true
            }
            #expect(sockets.sorted() == ["3", "4"], "the worker holds exactly its two sockets")
            let uid = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8).split(separator: "\n")
                .first { $0.hasPrefix("Uid:") }
            #expect(uid?.split(separator: "\t").dropFirst().allSatisfy { $0 == "65534" } == true, "\(uid ?? "")")
        }

        // whoami over UDP from an IPv6 peer, answered by the pid the daemon reports for that slot.
        let udp = try udpEndpoint(services, "env")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV6, 0))
        let reply = try #require(try Whoami.ask([client], to: udp)[0])
        #expect(reply.peer == "[::1]:\(client.local.port)")
        #expect(slots.first { $0.slot == reply.slot }?.pid == reply.pid)

        // whoami over TCP: one answer per line.
        let tcpText = try #require(services[0].listeners.first { $0.hasPrefix("tcp://") })
        let stream = try FlowClient(.tcp, local: SocketAddress(.loopbackV6, 0))
        try stream.connect(to: try Endpoint(parsing: tcpText).address)
        _ = Array("first\nsecond\n".utf8).withUnsafeBytes { write(stream.fd, $0.baseAddress, $0.count) }
        var received: [UInt8] = []
        let deadline = nowMs() + 10_000
        while received.filter({ $0 == 0x0a }).count < 4, nowMs() < deadline {
            if let bytes = try stream.receive(timeoutMs: 200) { received += bytes }
        }
        let answer = String(decoding: received, as: UTF8.self).split(separator: "\n")
        #expect(answer.count == 4, "\(answer)")
        if answer.count == 4 {
            #expect(answer[0].hasPrefix("slot=") && answer[0].hasSuffix("service=env peer=[::1]:\(stream.local.port)"))
            #expect(answer[1] == "first" && answer[3] == "second")
            #expect(answer[2] == answer[0])
        }
    }

    /// SIGKILL the daemon: its workers outlive it and keep answering. Once they are gone too,
    /// the next daemon finds nothing to adopt and replaces the stale maps with its own.
    @Test func workersOutliveTheDaemon() throws {
        let daemon = try TestDaemon(config: serviceTable("orphans", workers: 3, program: "builtin = \"echo\""))
        let services = try daemon.waitForWorkers()
        let pids = services[0].slots.compactMap(\.pid)
        daemon.signal(SIGKILL)
        #expect(daemon.waitForExit(timeoutMs: 30_000) == 128 + SIGKILL)
        sleepMs(200)
        #expect(pids.allSatisfy(processExists), "every worker outlives the daemon")
        let orphan = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try orphan.send(Array("orphaned".utf8), to: udpEndpoint(services, "orphans"))
        #expect(try orphan.receive(timeoutMs: 10_000) == Array("orphaned".utf8), "the workers serve without a daemon")
        #expect(Set(daemon.pinnedWorkers()["orphans"] ?? []) == Set(pids), "the pins name them, with their start times")
        daemon.killPinnedWorkers()
        let deadline = nowMs() + 10_000
        while pids.contains(where: processExists) && nowMs() < deadline { sleepMs(20) }

        // Its pins stay behind; the next daemon has nothing to adopt, replaces them and serves.
        #expect(PinLayout.services(under: daemon.pinRoot) == ["orphans"])
        let stale = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "orphans"))
        #expect(try stale.readConfig().slot_count == 3)
        let next = try TestDaemon(config: serviceTable("orphans", workers: 2, program: "builtin = \"echo\""),
                                  pinRoot: daemon.pinRoot)
        let restarted = try next.waitForWorkers()
        // Replaced, not reused: the stale maps (still open here) keep the old configuration.
        #expect(try stale.readConfig().slot_count == 3, "the next daemon made new maps")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try client.send(Array("after".utf8), to: udpEndpoint(restarted, "orphans"))
        #expect(try client.receive(timeoutMs: 10_000) == Array("after".utf8), "echo answers")
        let config = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "orphans")).readConfig()
        #expect(config.slot_count == 2, "\(config) \(next.log)")
    }

    /// restart and scale through the control socket; its mode; errors name what is wrong;
    /// a second daemon on the same run folder is refused.
    @Test func controlSocketActions() throws {
        let daemon = try TestDaemon(config: serviceTable("ctl", workers: 2))
        let before = try daemon.waitForWorkers()[0].slots
        var info = stat()
        #expect(stat("\(daemon.runDirectory)/control.sock", &info) == 0 && info.st_mode & 0o777 == 0o600)

        let restarted = try daemon.request(.init(command: .restart, service: "ctl", slot: 1))
        #expect(restarted.ok, "\(restarted)")
        let after = try daemon.waitFor("slot 1 has a new worker") { services in
            let slot = services[0].slots[1]
            return slot.pid != nil && slot.pid != before[1].pid && slot.restarts == 1
        }[0].slots
        #expect(after[0].pid == before[0].pid, "slot 0 is untouched")
        let gone = nowMs() + 10_000
        while processExists(before[1].pid!) && nowMs() < gone { sleepMs(20) }
        #expect(!processExists(before[1].pid!), "the old worker of slot 1 was stopped")

        let scaled = try daemon.request(.init(command: .scale, workers: 3, now: true))
        #expect(scaled.ok && scaled.message?.contains("1365 of 4096 buckets moved at once") == true, "\(scaled)")
        try daemon.waitForWorkers()
        let table = try pinnedBuckets(daemon, service: "ctl")
        #expect(Set(table) == [0, 1, 2])

        let unknown = try daemon.request(.init(command: .restart, service: "nope", slot: 0))
        #expect(!unknown.ok && unknown.error == "no service named 'nope': this daemon runs ctl")
        let badSlot = try daemon.request(.init(command: .restart, service: "ctl", slot: 7))
        #expect(!badSlot.ok && badSlot.error?.contains("has no slot 7") == true)
        let badScale = try daemon.request(.init(command: .scale, service: "ctl", workers: 0))
        #expect(!badScale.ok && badScale.error?.contains("between 1 and 1024") == true)

        let output = "\(daemon.directory.path)/second.log"
        let second = try spawn([TestDaemon.builtBinary, "--config", daemon.configPath, "--pin-dir", daemon.pinRoot,
                                "--run-dir", daemon.runDirectory], output: output)
        #expect(waitExit(second, timeoutMs: 30_000) == 1)
        #expect((try? String(contentsOfFile: output, encoding: .utf8))?.contains("another reuseportd is running") == true)
        #expect(try daemon.status()[0].slots.count == 3, "the first daemon is unaffected")
    }

    /// Peer credentials are checked even if the socket's mode is opened up: another user is refused.
    @Test(.enabled(if: access("/usr/bin/socat", X_OK) == 0, "socat is not installed (make deps installs it)"))
    func controlSocketRefusesOtherUsers() throws {
        let daemon = try TestDaemon(config: serviceTable("private", workers: 1))
        try daemon.waitForWorkers()
        let socketPath = "\(daemon.runDirectory)/control.sock"
        chmod(daemon.directory.path, 0o755)
        // The daemon makes its run folder 0711 (docs/operations.md, "Folders root trusts"): open it to reading too.
        chmod(daemon.runDirectory, 0o755)
        chmod(socketPath, 0o666)
        let output = "\(daemon.directory.path)/refused"
        let pid = try spawn(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c",
                             "echo '{\"command\":\"status\"}' | /usr/bin/socat - UNIX-CONNECT:\(socketPath)"],
                            output: output)
        #expect(waitExit(pid, timeoutMs: 30_000) == 0)
        let answer = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        #expect(answer.contains("\"ok\":false") && answer.contains("permission denied"), "\(answer)")
        #expect(!answer.contains("services"), "nothing is revealed")
        // The refused client's answer says only "permission denied"; who was refused is in the log alone.
        #expect(daemon.log.contains("control: refused a client of uid 65534"))
    }

    /// The built-in worker under systemd-socket-activate (no REUSEPORT_* variables: slot and service are "-").
    @Test(.enabled(if: access("/usr/bin/systemd-socket-activate", X_OK) == 0, "systemd-socket-activate is not installed"))
    func builtinWorkerRunsUnderSystemdSocketActivate() throws {
        // A free port (systemd-socket-activate binds without SO_REUSEPORT).
        let port = try freePort()
        let directory = try TemporaryDirectory()
        let pid = try spawn(["/usr/bin/systemd-socket-activate", "--datagram", "-l", "127.0.0.1:\(port)",
                             TestDaemon.builtBinary, "worker", "whoami"], output: "\(directory.path)/log")
        defer {
            kill(pid, SIGKILL)
            _ = waitExit(pid, timeoutMs: 2000)
        }
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        var reply: [UInt8]?
        let deadline = nowMs() + 5000
        while reply == nil && nowMs() < deadline {
            try client.send(Array("hi".utf8), to: SocketAddress(.loopbackV4, port))
            reply = try client.receive(timeoutMs: 200)
        }
        let log = (try? String(contentsOfFile: "\(directory.path)/log", encoding: .utf8)) ?? ""
        let answer = String(decoding: try #require(reply, "no answer; log: \(log)"), as: UTF8.self)
        // systemd-socket-activate execs the worker in its own process: LISTEN_PID is that pid.
        #expect(answer == "slot=- pid=\(pid) service=- peer=127.0.0.1:\(client.local.port)\nhi")
    }
}
