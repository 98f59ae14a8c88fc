#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Adoption once an upgrade has completed: the working generation's slots are 4..7 (or, after
/// a scale, 0, 1 and 4..7), not 0..<workers, and the old generation's slots are gone. A daemon
/// that execs itself, or one started on the pins of a killed daemon, must find and adopt every
/// worker from what the pins say, move no live flow, and its graceful stop must leave no worker
/// behind. Real daemon, whoami workers, datagrams on loopback.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct AdoptionAfterUpgradeTests {
    static func config(_ name: String, listen: [String] = ["udp://127.0.0.1:0"], workers: Int = 4) -> String {
        // A short idle timeout so the upgrade's change learns, switches and ends in seconds; a
        // short drain timeout so old TCP workers are not held for the default hour.
        serviceTable(name, listen: listen, workers: workers, extra: """
            rcvbuf = 8388608
            flow_idle_timeout_ms = 1000
            drain_timeout_ms = 2000
            """)
    }

    /// A worker process, named by its pid and start time so that cleanup never signals a
    /// process that reused the pid.
    struct Worker: Hashable, CustomStringConvertible {
        var pid: pid_t
        var startTime: UInt64
        init?(_ pid: pid_t?) {
            guard let pid, let start = try? Syscall.processStartTime(pid) else { return nil }
            self.pid = pid
            startTime = start
        }
        var alive: Bool { processExists(pid) && (try? Syscall.processStartTime(pid)) == startTime }
        var description: String { "\(pid)" }
    }

    /// Every worker the test saw, killed (with its process group) when the test ends, passed or
    /// not: a failed adoption leaves workers that no daemon supervises and nothing else stops.
    final class Witnessed {
        private(set) var workers: Set<Worker> = []
        func note(_ services: [ServiceStatus]) {
            for slot in services.flatMap(\.slots) { if let worker = Worker(slot.pid) { workers.insert(worker) } }
        }
        var alive: [Worker] { workers.filter(\.alive).sorted { $0.pid < $1.pid } }
        deinit { for worker in workers where worker.alive { kill(-worker.pid, SIGKILL) } }
    }

    static func maps(_ daemon: TestDaemon, _ service: String) throws -> DispatchMaps {
        try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: service))
    }

    /// Upgrades `service` (same definition, new generation) and waits until generation 2 works,
    /// generation 1's slots have retired, its workers are gone and the placement change has
    /// ended in the pins (phase NONE): an upgrade with nothing left in progress.
    static func upgradeToCompletion(_ daemon: TestDaemon, _ service: String, workers: Int, seen: Witnessed) throws
        -> [ServiceStatus]
    {
        let old = try daemon.waitForWorkers()
        seen.note(old)
        let response = try daemon.request(ControlRequest(command: .upgrade, service: service))
        #expect(response.ok, "the upgrade was refused: \(response)")
        let upgraded = try daemon.waitFor("generation 2 working alone, the change ended", timeoutMs: 60_000) { services in
            seen.note(services)
            let slots = services[0].slots
            guard services[0].upgrade?.phase == .switched, slots.count == workers,
                  slots.allSatisfy({ $0.generation == 2 && $0.state == "running" && $0.pid != nil }),
                  let change = try? Self.maps(daemon, service).readTransition()
            else { return false }
            return change.phase == RP_TRANSITION_NONE.rawValue
        }
        let gone = nowMs() + 15_000
        let oldWorkers = old[0].slots.compactMap { Worker($0.pid) }
        while oldWorkers.contains(where: { $0.alive }), nowMs() < gone { sleepMs(20) }
        let lingering = oldWorkers.filter { $0.alive }
        #expect(lingering.isEmpty, "generation 1's workers \(lingering) were not stopped after it retired")
        return upgraded
    }

    /// Whether `endpoint`'s port can be taken by a new socket without SO_REUSEPORT: nothing
    /// holds it any more. TCP: SO_REUSEADDR and listen(), so that connections in TIME_WAIT do
    /// not count, but any listener does.
    static func isFree(_ endpoint: Endpoint) -> Bool {
        guard let probe = try? Syscall.socket(endpoint.address.address.family, endpoint.transport.socketType, "probe")
        else { return false }
        if endpoint.transport == .tcp {
            var one: Int32 = 1
            setsockopt(probe.fd.rawValue, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        guard (try? Syscall.bind(probe.fd, endpoint.address, "probe")) != nil else { return false }
        return endpoint.transport != .tcp || listen(probe.fd.rawValue, 1) == 0
    }

    /// A graceful stop: the daemon exits 0, no worker it had (or the pins named) still runs, and
    /// every listener's port is free.
    static func checkGracefulStop(_ daemon: TestDaemon, _ listeners: [Endpoint], seen: Witnessed) {
        let status = daemon.stop(timeoutMs: 20_000)
        // The stop waits for every worker it tracks; give any other a generous while to exit too.
        let deadline = nowMs() + 5000
        while !seen.alive.isEmpty, nowMs() < deadline { sleepMs(20) }
        let survivors = seen.alive
        let taken = listeners.filter { !isFree($0) }
        let claimed = daemon.log.contains("every worker exited")
        print("graceful stop: status \(String(describing: status)), \(survivors.count) workers still running "
            + "\(survivors), ports still held \(taken), log says every worker exited: \(claimed)")
        #expect(status == 0, "the daemon stopped cleanly: \(daemon.logTail(5))")
        #expect(survivors.isEmpty, "\(survivors.count) workers outlived the graceful stop: \(survivors)")
        #expect(taken.isEmpty, "ports still held after the stop: \(taken)")
        #expect(!(claimed && !survivors.isEmpty), "the log said every worker exited while \(survivors) ran")
    }

    /// Upgrade to completion, then 64 live flows, then `reexec`: the new image adopts all four
    /// generation-2 workers (slots 4..7) with their sockets; no flow changes worker, none loses a
    /// datagram. Then a graceful stop leaves no worker and frees the port.
    @Test func reexecAfterACompletedUpgradeAdoptsEveryWorker() throws {
        let seen = Witnessed()
        let daemon = try TestDaemon(config: Self.config("upexec"))
        let upgraded = try Self.upgradeToCompletion(daemon, "upexec", workers: 4, seen: seen)[0]
        let destination = try udpEndpoint([upgraded], "upexec")
        let before = upgraded.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        let identity = try daemon.request(ControlRequest(command: .status)).daemon
        let sessions = try Sessions(64, periodMs: 100)
        try sessions.run(5, to: destination)
        var answer: ControlResponse?
        try sessions.run(20, to: destination) { round in
            if round == 10 { answer = try daemon.request(ControlRequest(command: .reexec)) }
        }
        #expect(answer?.ok == true, "reexec was refused: \(String(describing: answer))")
        let after = try daemon.waitFor("the new image with every slot's worker running") { services in
            seen.note(services)
            guard (try? daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs) != identity?.startedAtNs
            else { return false }
            return services[0].slots.allSatisfy { $0.state == "running" && $0.pid != nil }
        }[0]
        try sessions.run(10, to: destination)
        let now = after.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        print("reexec after a completed upgrade, 64 flows × \(sessions.rounds) rounds: \(sessions.moved.count) "
            + "flows moved, \(sessions.lost) datagrams lost; workers adopted: \(after.adoptedWorkers ?? -1) of 4; "
            + "slot/pid \(before) → \(now)")
        #expect(after.adoptedWorkers == 4, "workers adopted: \(after.adoptedWorkers ?? -1) of 4 (\(before) → \(now))")
        #expect(now == before, "the same workers on the same slots: \(before) → \(now)")
        #expect(sessions.moved.isEmpty, "\(sessions.moved.count) of 64 live flows changed worker")
        #expect(sessions.lost == 0, "\(sessions.lost) datagrams lost across the reexec: \(sessions.report)")
        #expect(!daemon.log.contains("removing stale pins"), "the pins were taken over, not removed as stale")
        // What the pins say, read by reuseportctl: generation 2 alone, on its slots; the retired
        // slots are not listed (no stale generation, no "joining").
        let dump = try Subprocess.run(BuiltProducts.path("reuseportctl"),
                                      ["map", "dump", "--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory],
                                      captureStandardError: true)
        let lines = dump.output.split(separator: "\n")
        let generationLine = lines.first { $0.hasPrefix("  generation ") }.map(String.init) ?? "none"
        let listed = lines.compactMap { line -> UInt32? in
            let fields = line.split(separator: " ")
            return fields.count > 3 && line.hasPrefix("  ") ? UInt32(fields[0]) : nil
        }
        print("map dump after the reexec: \(generationLine.trimmingCharacters(in: .whitespaces)); slots listed \(listed)")
        #expect(generationLine.contains("2 working (slots 4,5,6,7)  last 2"), "map dump: \(generationLine)")
        #expect(!dump.output.contains("draining") && !dump.output.contains("joining"), "stale labels: \(dump.output)")
        #expect(listed == [4, 5, 6, 7], "map dump lists the retired slots: \(listed)")
        Self.checkGracefulStop(daemon, [try Endpoint(parsing: upgraded.listeners[0])], seen: seen)
    }

    /// Upgrade to completion, optionally scale (to 6: the working generation then holds slots
    /// 0, 1, 4..7), 64 live flows, SIGKILL the daemon, start another on the same pins: it starts
    /// (the port is its own group, not taken), adopts every worker on its slot with its sockets
    /// (UDP on IPv4 and TCP on IPv6), and no flow moves. Its graceful stop leaves no worker.
    @Test(arguments: [4, 6])
    func aKilledDaemonsWorkersAreAdoptedAfterACompletedUpgrade(workers: Int) throws {
        let seen = Witnessed()
        let name = "upkill\(workers)"
        // Fixed ports, as a real configuration has: the next daemon must bind the same ones, and
        // finds them held by the workers it is to adopt.
        let udpPort = try freePort()
        let tcpPort = try freePort()
        let listen = ["udp://127.0.0.1:\(udpPort)", "tcp://[::1]:\(tcpPort)"]
        let first = try TestDaemon(config: Self.config(name, listen: listen))
        var status = try Self.upgradeToCompletion(first, name, workers: 4, seen: seen)[0]
        if workers != 4 {
            let scaled = try first.request(ControlRequest(command: .scale, service: name, workers: workers))
            #expect(scaled.ok, "the scale was refused: \(scaled)")
            status = try first.waitFor("\(workers) running workers, the change ended", timeoutMs: 60_000) { services in
                seen.note(services)
                guard services[0].slots.count == workers,
                      services[0].slots.allSatisfy({ $0.state == "running" && $0.pid != nil }),
                      let change = try? Self.maps(first, name).readTransition()
                else { return false }
                return change.phase == RP_TRANSITION_NONE.rawValue
            }[0]
        }
        let listeners = try status.listeners.map { try Endpoint(parsing: $0) }
        let destination = try udpEndpoint([status], name)
        let tcp = try #require(listeners.first { $0.transport == .tcp }).address
        let before = status.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        let sessions = try Sessions(64, periodMs: 100)
        try sessions.run(5, to: destination)
        first.signal(SIGKILL)
        #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
        var second: TestDaemon?
        try sessions.run(15, to: destination) { round in
            if round == 10 {
                second = try TestDaemon(config: Self.config(name, listen: listen, workers: workers),
                                        pinRoot: first.pinRoot)
            }
        }
        let daemon = try #require(second)
        let after = try daemon.waitFor("\(workers) running workers after the restart") { services in
            seen.note(services)
            return services[0].slots.count == workers
                && services[0].slots.allSatisfy { $0.state == "running" && $0.pid != nil }
        }[0]
        try sessions.run(10, to: destination)
        let now = after.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        // The TCP listener's sockets were adopted too: a new connection is answered by one of
        // the adopted workers.
        let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV6, 0))
        try client.connect(to: tcp)
        try client.send(Array("hello\n".utf8), to: tcp)
        let reply = try client.receive(timeoutMs: 3000).flatMap { WhoamiReply($0) }
        print("SIGKILL after a completed upgrade (\(workers) workers), 64 flows × \(sessions.rounds) rounds: "
            + "\(sessions.moved.count) flows moved, \(sessions.lost) datagrams lost; workers adopted: "
            + "\(after.adoptedWorkers ?? -1) of \(workers); slot/pid \(before) → \(now); TCP answered by "
            + "\(reply.map { "\($0.slot)/\($0.pid)" } ?? "nobody")")
        #expect(after.adoptedWorkers == workers, "workers adopted: \(after.adoptedWorkers ?? -1) of \(workers)")
        #expect(now == before, "the same workers on the same slots: \(before) → \(now)")
        #expect(sessions.moved.isEmpty, "\(sessions.moved.count) of 64 live flows changed worker")
        #expect(sessions.lost == 0, "\(sessions.lost) datagrams lost while no daemon ran and after: \(sessions.report)")
        #expect(reply.map { r in after.slots.contains { $0.slot == r.slot && $0.pid == r.pid } } == true,
                "a TCP connection on [::1] is answered by an adopted worker: \(String(describing: reply))")
        Self.checkGracefulStop(daemon, listeners, seen: seen)
    }

    /// Pins as the previous release left them once an upgrade completed: socket_slots 0 (it was
    /// written only during a change) and the retired rows 0..3 still labelled generation 1,
    /// "joining". A daemon started on them (the first start of this release after a kill of the
    /// old one) still finds the workers of slots 4..7 from the rows and adopts them all.
    @Test func pinsOfThePreviousReleaseAfterAnUpgradeAreAdopted() throws {
        let seen = Witnessed()
        let port = try freePort()
        let config = Self.config("legacy", listen: ["udp://127.0.0.1:\(port)"])
        let first = try TestDaemon(config: config)
        let upgraded = try Self.upgradeToCompletion(first, "legacy", workers: 4, seen: seen)[0]
        let destination = try udpEndpoint([upgraded], "legacy")
        let before = upgraded.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        let sessions = try Sessions(64, periodMs: 100)
        try sessions.run(5, to: destination)
        first.signal(SIGKILL)
        #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
        let maps = try Self.maps(first, "legacy")
        var change = try maps.readTransition()
        change.socket_slots = 0
        try maps.transition.update(0, change)
        for slot in UInt32(0)..<4 {
            var row = try maps.readSlotState(slot)
            (row.generation, row.flags, row.state) = (1, UInt32(RP_SLOT_JOINING), WorkerState.empty.rawValue)
            try maps.slotState.update(slot, row)
        }
        var second: TestDaemon?
        try sessions.run(10, to: destination) { round in
            if round == 7 { second = try TestDaemon(config: config, pinRoot: first.pinRoot) }
        }
        let daemon = try #require(second)
        let after = try daemon.waitFor("every slot's worker running after the restart") { services in
            seen.note(services)
            return services[0].slots.allSatisfy { $0.state == "running" && $0.pid != nil }
        }[0]
        try sessions.run(5, to: destination)
        let now = after.slots.map { "\($0.slot)/\($0.pid ?? 0)" }
        print("pins of the previous release after an upgrade, 64 flows × \(sessions.rounds) rounds: "
            + "\(sessions.moved.count) flows moved, \(sessions.lost) datagrams lost; workers adopted: "
            + "\(after.adoptedWorkers ?? -1) of 4; slot/pid \(before) → \(now); socket_slots now "
            + "\(try maps.readTransition().socket_slots)")
        #expect(after.adoptedWorkers == 4, "workers adopted: \(after.adoptedWorkers ?? -1) of 4")
        #expect(now == before, "the same workers on the same slots: \(before) → \(now)")
        #expect(sessions.moved.isEmpty, "\(sessions.moved.count) of 64 live flows changed worker")
        #expect(sessions.lost == 0, "\(sessions.lost) datagrams lost while no daemon ran and after: \(sessions.report)")
        #expect(try maps.readTransition().socket_slots == 8, "the pins now bound every slot holding a socket")
        Self.checkGracefulStop(daemon, [try Endpoint(parsing: upgraded.listeners[0])], seen: seen)
    }

    /// A worker that only the pins name (its row written behind the daemon's back, as a missed
    /// adoption leaves one): the graceful stop stops it too, through a pidfd proven to be it, and
    /// only then says every worker exited.
    @Test func aGracefulStopStopsAWorkerOnlyThePinsName() throws {
        // A short stop timeout: the stray below ignores SIGTERM (the test runner's children
        // inherit it blocked), so it is stopped by the SIGKILL that follows.
        let daemon = try TestDaemon(config: "stop_timeout_ms = 1000\n" + Self.config("stray"))
        let services = try daemon.waitForWorkers()
        let stray = try Subprocess("/bin/sleep", ["600"])
        defer { if processExists(stray.pid) { kill(stray.pid, SIGKILL) } }
        let start = try #require(try Syscall.processStartTime(stray.pid))
        let maps = try Self.maps(daemon, "stray")
        // Slot 9: no slot of the service (it has 0..3), as the slots an adoption missed were.
        try maps.slotState.update(UInt32(9), rp_slot_state(
            pid: UInt32(stray.pid), state: WorkerState.running.rawValue, restarts: 0, generation: 1,
            since_ns: 0, socket_cookie: 0, stalls: 0, watchdog_restarts: 0, records: 0, flags: 0, start_time: start))
        let status = daemon.stop(timeoutMs: 20_000)
        let exit = stray.wait(timeoutMs: 5000)
        let workers = services[0].slots.compactMap(\.pid).filter(processExists)
        print("graceful stop with a worker only the pins name (pid \(stray.pid)): daemon status "
            + "\(String(describing: status)), that worker's exit \(String(describing: exit)), supervised workers left "
            + "\(workers)")
        #expect(status == 0, "the daemon stopped cleanly: \(daemon.logTail(5))")
        #expect(exit != nil, "the worker only the pins named outlived the graceful stop")
        #expect(workers.isEmpty, "supervised workers outlived the stop: \(workers)")
        #expect(daemon.log.contains("which this daemon does not supervise: stopping it"), "\(daemon.logTail(8))")
    }
}
