#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Reload, stop and bad input, with the real daemon binary.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct LifecycleTests {
    /// The immediate path (flow tracking off): FlowTrackingTests covers changes that keep live flows.
    static func config(workers: Int) -> String { serviceTable("grow", workers: workers, extra: "flow_tracking = false") }

    /// SIGHUP with 4 → 6 → 3 workers: only the flows that must move do (to a new slot when
    /// growing, from a removed slot when shrinking), and their share is the ideal one.
    @Test func sighupResizingMovesOnlyTheMinimumShareOfFlows() throws {
        let daemon = try TestDaemon(config: LifecycleTests.config(workers: 4))
        let destination = try udpEndpoint(try daemon.waitForWorkers("running"), "grow")
        let clients = try Traffic.clients(1024, on: .loopbackV4)
        var previous = try Whoami.ask(clients, to: destination).map { try #require($0).slot }
        var table = try pinnedBuckets(daemon, service: "grow")

        var removedPids: [Int32] = []
        for (from, to) in [(4, 6), (6, 3)] {
            let before = try daemon.status()[0].slots
            removedPids = before.filter { $0.slot >= UInt32(to) }.compactMap(\.pid)
            try daemon.rewriteConfig(LifecycleTests.config(workers: to))
            daemon.signal(SIGHUP)
            try daemon.waitFor("\(to) workers with a pid") { services in
                services[0].slots.count == to && services[0].slots.allSatisfy { $0.pid != nil }
            }
            let current = try Whoami.ask(clients, to: destination).map { try #require($0).slot }
            let newTable = try pinnedBuckets(daemon, service: "grow")
            let kept = Set(0..<UInt32(min(from, to)))
            let moved = zip(previous, current).filter { $0 != $1 }
            let share = Double(moved.count) / Double(clients.count)
            // Growing N → M moves (M−N)/M of the flows; shrinking moves the removed slots' (N−M)/N.
            let ideal = from < to ? Double(to - from) / Double(to) : Double(from - to) / Double(from)
            let movedBuckets = BucketAssignment.moved(from: table, to: newTable)
            let minimumBuckets = zip(table, newTable).filter { !kept.contains($0.0) || !kept.contains($0.1) }.count
            print("SIGHUP \(from) → \(to) workers: \(moved.count) of \(clients.count) flows moved "
                + String(format: "(%.1f%%, ideal %.1f%%)", share * 100, ideal * 100)
                + "; \(movedBuckets) of \(table.count) buckets moved")
            for (old, new) in moved {
                #expect(!kept.contains(old) || !kept.contains(new), "a flow moved between kept slots \(old) → \(new)")
            }
            #expect(movedBuckets == minimumBuckets, "no bucket moved between two kept slots")
            let perSlot = newTable.reduce(into: [UInt32: Int]()) { $0[$1, default: 0] += 1 }
            #expect(perSlot.count == to && perSlot.values.max()! - perSlot.values.min()! <= 1, "balanced: \(perSlot)")
            #expect(abs(share - ideal) < 0.06, "moved share \(share) is near the ideal \(ideal)")
            #expect(Set(current).count == to, "every slot serves")
            previous = current
            table = newTable
        }
        // The workers of removed slots are stopped.
        let deadline = nowMs() + 20_000
        while removedPids.contains(where: processExists) && nowMs() < deadline { sleepMs(20) }
        #expect(!removedPids.contains(where: processExists), "the workers of slots 3 to 5 exited")
    }

    /// Reloads that add a service, change a program (a new generation of workers on new slots)
    /// and remove a service (workers stopped, sockets closed, pins removed).
    @Test func reloadAddsChangesAndRemovesServices() throws {
        let first = serviceTable("kept", workers: 2)
        let daemon = try TestDaemon(config: first)
        let before = try daemon.waitForWorkers()
        let kept = try udpEndpoint(before, "kept")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        #expect(try Whoami.ask([client], to: kept)[0]?.service == "kept")

        try daemon.rewriteConfig(first + serviceTable("added", listen: ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"],
                                                      workers: 1, program: "builtin = \"echo\""))
        let added = try daemon.request(.init(command: .reload))
        #expect(added.ok && added.message == "reloaded: added added", "\(added)")
        let both = try daemon.waitForWorkers()
        #expect(both.map(\.name) == ["kept", "added"] && both[0].slots.map(\.pid) == before[0].slots.map(\.pid))
        let echo = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try echo.send(Array("ping".utf8), to: udpEndpoint(both, "added"))
        #expect(try echo.receive(timeoutMs: 10_000) == Array("ping".utf8))
        // TCP echo returns the stream.
        let stream = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
        try stream.connect(to: Endpoint(parsing: try #require(both[1].listeners.first { $0.hasPrefix("tcp") })).address)
        _ = Array("a stream".utf8).withUnsafeBytes { write(stream.fd, $0.baseAddress, $0.count) }
        #expect(try stream.receive(timeoutMs: 10_000) == Array("a stream".utf8))

        // Another program for "kept" (echo): a new generation on new slots, switched to once its
        // workers are ready (learning for the 200 ms idle timeout); "added" removed.
        try daemon.rewriteConfig(serviceTable("kept", workers: 2, program: "builtin = \"echo\"",
                                              extra: "flow_idle_timeout_ms = 200"))
        daemon.signal(SIGHUP)
        let after = try daemon.waitFor("kept upgraded to echo, added gone") { services in
            services.map(\.name) == ["kept"] && services[0].upgrade?.phase == .switched
                && services[0].slots.allSatisfy { $0.generation == 2 && $0.pid != nil }
        }
        #expect(after[0].slots.map(\.slot) == [2, 3], "the new generation's slots")
        #expect(try udpEndpoint(after, "kept") == kept, "the same listener")
        let fresh = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try fresh.send(Array("echoed".utf8), to: kept)
        #expect(try fresh.receive(timeoutMs: 10_000) == Array("echoed".utf8), "kept now runs echo")
        #expect(PinLayout.services(under: daemon.pinRoot) == ["kept"], "the removed service's pins are gone")
        let addedPort = try udpEndpoint(both, "added")
        let probe = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(probe) }
        // Its worker serves the TCP connection this test still holds for up to 2 s (graceful stop).
        let freed = nowMs() + 5000
        var bound = false
        while !bound, nowMs() < freed {
            bound = addedPort.withSockaddr { bind(probe, $0, $1) } == 0
            if !bound { sleepMs(20) }
        }
        #expect(bound, "the removed service's socket is closed")
    }

    /// A reload that needs new sockets on a fixed port (here: another rcvbuf) rebuilds the service
    /// although its old workers still hold the old sockets for a moment: its own group is not "taken".
    @Test func reloadRebuildsAServiceOnAFixedPort() throws {
        let port = try freePort()
        let listen = ["udp://127.0.0.1:\(port)"]
        let daemon = try TestDaemon(config: serviceTable("fixed", listen: listen, workers: 2))
        let before = try daemon.waitForWorkers()[0].slots.compactMap(\.pid)
        try daemon.rewriteConfig(serviceTable("fixed", listen: listen, workers: 2, extra: "rcvbuf = 1048576"))
        let response = try daemon.request(.init(command: .reload))
        #expect(response.ok && response.message == "reloaded: rebuilt fixed", "\(response)")
        let after = try daemon.waitForWorkers()[0].slots.compactMap(\.pid)
        #expect(Set(after).isDisjoint(with: before), "new workers")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        #expect(try Whoami.ask([client], to: SocketAddress(.loopbackV4, port))[0].map { after.contains($0.pid) } == true)
    }

    /// A reload with an invalid file keeps the running configuration.
    @Test func invalidReloadKeepsTheRunningConfiguration() throws {
        let daemon = try TestDaemon(config: LifecycleTests.config(workers: 2))
        let running = try daemon.waitForWorkers()[0].slots.map(\.pid)
        try daemon.rewriteConfig(LifecycleTests.config(workers: 0))
        let response = try daemon.request(.init(command: .reload))
        #expect(!response.ok)
        #expect(response.error?.contains("service[0].workers") == true, "\(response.error ?? "")")
        daemon.signal(SIGHUP)
        sleepMs(200)
        let after = try daemon.status()[0].slots
        #expect(after.count == 2)
        #expect(after.map(\.pid) == running, "the same workers serve on")
        // A SIGHUP has no one to answer: the log is the only place its refusal is reported.
        #expect(daemon.log.contains("reload (SIGHUP): the configuration is invalid, nothing changed: "
            + "\(daemon.configPath): service[0].workers"), "\(daemon.log)")
    }

    /// SIGTERM: every worker exits (one ignores SIGTERM and is killed at the timeout),
    /// every socket is closed, every pin and the control socket are removed, status 0.
    @Test func gracefulStopLeavesNoWorkerSocketOrPin() throws {
        let daemon = try TestDaemon(config: """
            stop_timeout_ms = 500

            [[service]]
            name = "plain"
            listen = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]
            workers = 3
            builtin = "echo"

            [[service]]
            name = "stubborn"
            listen = ["udp://[::1]:0"]
            workers = 2
            exec = ["/bin/sh", "-c", "trap '' TERM; exec \(TestDaemon.builtBinary) worker whoami"]
            """)
        let services = try daemon.waitForWorkers()
        let pids = services.flatMap { $0.slots.compactMap(\.pid) }
        let endpoints = try services.flatMap { try $0.listeners.map { try Endpoint(parsing: $0) } }
        #expect(pids.count == 5)
        #expect(PinLayout.services(under: daemon.pinRoot) == ["plain", "stubborn"])

        daemon.signal(SIGTERM)
        let status = daemon.waitForExit(timeoutMs: 30_000)
        #expect(status == 0, "exit status; log:\n\(daemon.log)")
        for pid in pids { #expect(!processExists(pid), "worker \(pid) is gone") }
        // The daemon has exited, and with it its control socket: only the log tells how a worker ended.
        #expect(daemon.log.contains("did not stop in time: SIGKILL"), "the stubborn workers were killed")
        // A socket without SO_REUSEPORT binds only if no socket holds the address any more.
        for endpoint in endpoints {
            let probe = socket(endpoint.address.address.family,
                               endpoint.transport == .udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue), 0)
            defer { close(probe) }
            let bound = endpoint.address.withSockaddr { bind(probe, $0, $1) }
            #expect(bound == 0, "\(endpoint) is free: \(String(cString: strerror(errno)))")
        }
        #expect(access(daemon.pinRoot, F_OK) != 0, "the pin folder is gone")
        #expect(access("\(daemon.runDirectory)/control.sock", F_OK) != 0, "the control socket is gone")
    }

    /// Invalid configurations: exit status 2, and the message names the file, the key and the problem.
    @Test(arguments: [
        ("syntax", "[[service]\nname = \"x\"\n", ["line 1", "TOML syntax error"]),
        ("unknown key", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\nworkers = 1\nbuiltin = \"echo\"\nworkerz = 2\n",
         ["service[0].workerz", "unknown key"]),
        ("bad address", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.300:53\"]\nworkers = 1\nbuiltin = \"echo\"\n",
         ["service[0].listen[0]", "not an IPv4 or IPv6 address"]),
        ("bad port", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.1:70000\"]\nworkers = 1\nbuiltin = \"echo\"\n",
         ["service[0].listen[0]", "not a port"]),
        ("duplicate port", """
            [[service]]
            name = "a"
            listen = ["udp://127.0.0.1:5399"]
            workers = 1
            builtin = "echo"
            [[service]]
            name = "b"
            listen = ["udp://0.0.0.0:5399"]
            workers = 1
            builtin = "echo"
            """, ["service[1].listen[0]", "overlaps udp://127.0.0.1:5399 of service[0].listen[0]"]),
        ("zero workers", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\nworkers = 0\nbuiltin = \"echo\"\n",
         ["service[0].workers", "must be between 1 and 1024, got 0"]),
        ("no program", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\nworkers = 1\n",
         ["service[0]", "needs either exec"]),
        ("unknown user", "[[service]]\nname = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\nworkers = 1\nbuiltin = \"echo\"\nuser = \"no-such-user-here\"\n",
         ["service[0].user", "no such user"]),
    ])
    func badConfigurationExitsWithStatus2(name: String, config: String, expected: [String]) throws {
        let directory = try TemporaryDirectory()
        let file = try directory.write("bad.toml", config)
        let output = "\(directory.path)/output"
        let pid = try spawn([TestDaemon.builtBinary, "--config", file, "--pin-dir", TestPinRoot.unique("bad"),
                             "--run-dir", "\(directory.path)/run"], output: output)
        let status = waitExit(pid, timeoutMs: 10_000)
        let message = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        #expect(status == 2, "\(name): status \(status.map(String.init) ?? "none"); output: \(message)")
        #expect(message.contains(file), "\(name): names the file: \(message)")
        for text in expected { #expect(message.contains(text), "\(name): says '\(text)': \(message)") }
        #expect(access("\(directory.path)/run", F_OK) != 0, "nothing was started")
    }

    /// A bind failure names the address and the reason, and the daemon exits 1 leaving nothing.
    @Test func bindFailureNamesTheAddress() throws {
        // A socket without SO_REUSEPORT holds the port.
        let holder = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(holder) }
        let any = SocketAddress(.loopbackV4, 0)
        _ = any.withSockaddr { bind(holder, $0, $1) }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(holder, $0, &length) }
        }
        let port = try #require(SocketAddress(storage: storage)).port
        let daemon = try TestDaemon(
            config: serviceTable("taken", listen: ["udp://127.0.0.1:\(port)"], workers: 2, program: "builtin = \"echo\""))
        #expect(daemon.waitForExit(timeoutMs: 30_000) == 1)
        // The daemon exits before it opens its control socket: the log is its only answer.
        #expect(daemon.log.contains("bind(udp://127.0.0.1:\(port)): Address already in use"), "\(daemon.log)")
        #expect(PinLayout.services(under: daemon.pinRoot).isEmpty, "no pins left")
    }

    /// A port already served by someone else's SO_REUSEPORT group is not joined (that would
    /// take the group over): the daemon refuses, names the address, and exits 1.
    @Test func aPortInAnotherReuseportGroupIsNotTakenOver() throws {
        let other = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(.loopbackV4, 0)))
        let daemon = try TestDaemon(config: serviceTable("intruder", listen: ["\(other.endpoint)"], workers: 1))
        #expect(daemon.waitForExit(timeoutMs: 30_000) == 1)
        // The daemon exits before it opens its control socket: the log is its only answer.
        #expect(daemon.log.contains("service intruder: \(other.endpoint) is already bound by another socket"), "\(daemon.log)")
        // The other group still gets its datagrams.
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try client.send(Array("mine".utf8), to: other.endpoint.address)
        let deliveries = try Traffic.receive(from: [0: other], expected: 1)
        #expect(deliveries.first?.payload == Array("mine".utf8))
    }

    /// A program that cannot be executed: its slots back off with the reason in the log,
    /// and the other service keeps answering.
    @Test func unstartableProgramBacksOffWhileOthersServe() throws {
        let daemon = try TestDaemon(config: serviceTable(
            "broken", workers: 2, program: "exec = [\"/nonexistent/server\", \"--flag\"]",
            extra: "restart_backoff_min_ms = 50\nrestart_backoff_max_ms = 200") + serviceTable("fine", workers: 1))
        let services = try daemon.waitFor("the broken slots restarting in back-off") { services in
            services[0].slots.allSatisfy { $0.restarts >= 2 && $0.state != "running" }
                && services[1].slots.allSatisfy { $0.state == "running" }
        }
        // `status` gives each slot's state and restarts (above), not why a start failed: that is
        // only in the log.
        let reasons = daemon.log.split(separator: "\n").filter {
            $0.contains("exec /nonexistent/server: No such file or directory")
        }
        for slot in 0..<2 {
            #expect(reasons.contains { $0.contains("service=broken") && $0.contains("slot=\(slot)") },
                    "slot \(slot)'s failure is logged: \(daemon.log)")
        }
        #expect(daemon.log.contains("exited with status 127"))
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        #expect(try Whoami.ask([client], to: udpEndpoint(services, "fine"))[0]?.service == "fine")
    }

    /// Without root (here: as nobody) the daemon says which privileges it needs, and exits 1.
    @Test func withoutPrivilegesItSaysWhichAreNeeded() throws {
        let directory = try TemporaryDirectory()
        // Root's folder and file (the daemon refuses a configuration others could change), and a
        // run folder of nobody's own, which nobody may use.
        chmod(directory.path, 0o755)
        let config = try directory.write("c.toml", serviceTable("unprivileged", workers: 1))
        chmod(config, 0o644)
        mkdir("\(directory.path)/run", 0o700)
        chown("\(directory.path)/run", 65534, 65534)
        let output = "\(directory.path)/output"
        let pid = try spawn(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", TestDaemon.builtBinary,
                             "--config", config, "--pin-dir", TestPinRoot.unique("unprivileged"),
                             "--run-dir", "\(directory.path)/run"], output: output)
        #expect(waitExit(pid, timeoutMs: 30_000) == 1)
        let message = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        #expect(message.contains("reuseportd: cannot start: service unprivileged: "), "\(message)")
        #expect(message.contains("Operation not permitted (errno 1); needs root, or CAP_BPF with CAP_NET_ADMIN"), "\(message)")
        #expect(access("\(directory.path)/run/control.sock", F_OK) != 0, "the control socket is removed")
    }
}
