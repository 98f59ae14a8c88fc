#if canImport(Glibc)
import Glibc
#endif
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport

/// The daemon end to end: start reuseportd (the binary beside this one, or $REUSEPORTD)
/// with 4 whoami workers on a port it picks, learn the port from its control socket and
/// the workers from its pinned rp_slot_state, SIGKILL one worker, and check that every flow
/// is answered from the same slot before and after, the killed slot's by the new worker.
enum DaemonCheck {
    static let all: [Check] = [endToEnd, adoption]

    static let slots: UInt32 = 4
    static let flows = 64
    static let service = "kernelcheck"
    /// Generous: under software emulation a worker start takes a while.
    static let waitMs = 30_000

    static var daemonPath: String {
        if let path = getenv("REUSEPORTD") { return String(cString: path) }
        return TestDaemon.builtBinary
    }

    static let config = """
        [[service]]
        name = "\(service)"
        listen = ["udp://127.0.0.1:0"]
        workers = \(slots)
        builtin = "whoami"
        """

    /// The reuseportd binary to run; a skip when there is none.
    static func binary() throws -> String {
        let binary = daemonPath
        guard access(binary, X_OK) == 0 else {
            throw CheckSkip(description: "no reuseportd at \(binary) (build it beside kernel-check, or set REUSEPORTD)")
        }
        return binary
    }

    static let endToEnd = Check(
        "daemon-end-to-end",
        "reuseportd with 4 whoami workers: SIGKILL one, every flow keeps its slot (the replacement answers)"
    ) { context in
        let daemon = try TestDaemon(config: config, binary: binary(), pinRoot: TestPinRoot.unique("kernel-check"),
                                    logLevel: nil)
        defer { daemon.stop() }
        let layout = PinLayout(root: daemon.pinRoot, service: service)
        func failure(_ what: String) -> CheckFailure {
            CheckFailure(description: "\(what); daemon log: \(daemon.logTail())")
        }

        let port = try waitFor("the daemon to report its port", failure) { () -> UInt16? in
            if let status = daemon.checkExited() { throw failure("reuseportd exited (status \(status))") }
            let listener = (try? daemon.status())?.first { $0.name == service }?.listeners.first { $0.hasPrefix("udp://") }
            return try listener.map { try Endpoint(parsing: $0).address.port }
        }
        let maps = try waitFor("the daemon's pins", failure) { try? DispatchMaps(pinned: layout) }
        func workers() throws -> [UInt32: UInt32]? {
            var pids: [UInt32: UInt32] = [:]
            for slot in 0..<slots {
                let row = try maps.readSlotState(slot)
                guard row.state == WorkerState.running.rawValue, row.pid != 0 else { return nil }
                pids[slot] = row.pid
            }
            return pids
        }
        let before = try waitFor("every worker running", failure) { try workers() }

        let destination = SocketAddress(.loopbackV4, port)
        let clients = try Traffic.clients(flows, on: .loopbackV4)
        let first = try ask(clients, destination, round: 1)
        let snapshot = try SteeringSnapshot(maps: maps, sockets: SocketArray(pinned: layout, listener: 0))
        let mispredicted = clients.filter {
            first[$0.local]?.slot != snapshot.placement(of: FlowTuple(.udp, from: $0.local, to: destination)).slot
        }.count
        let used = Set(first.values.map(\.slot))
        try context.expect(first.count == flows, "\(first.count) of \(flows) flows answered before the kill")
        try context.expect(mispredicted == 0, "\(mispredicted) flows answered from another slot than predicted")
        try context.expect(used.count == Int(slots), "only \(used.count) slots answered")

        // Kill slot 1's worker and ask again at once: the datagrams wait in slot 1's socket
        // for the replacement.
        let victim: UInt32 = 1
        try? Syscall.kill(pid_t(before[victim]!), SIGKILL)
        let killedAt = MonotonicClock.milliseconds()
        let second = try ask(clients, destination, round: 2, timeoutMs: waitMs)
        let restartMs = MonotonicClock.milliseconds() - killedAt
        let after = try waitFor("slot \(victim) running again", failure) { try workers() }
        let moved = clients.filter { first[$0.local]?.slot != second[$0.local]?.slot }.count
        let victimFlows = clients.filter { first[$0.local]?.slot == victim }
        let answeredByNew = victimFlows.filter { second[$0.local].map { UInt32($0.pid) } == after[victim]! }.count
        context.record("flows_moved", "\(moved)/\(flows)")
        context.record("killed_slot_flows_answered_by_replacement", "\(answeredByNew)/\(victimFlows.count)")
        context.record("kill_to_all_answered_ms", restartMs)
        try context.expect(second.count == flows, "\(second.count) of \(flows) flows answered after the kill")
        try context.expect(after[victim] != before[victim], "slot \(victim) still reports the killed pid")
        try context.expect(moved == 0, "\(moved) of \(flows) flows changed slot after the kill")
        try context.expect(!victimFlows.isEmpty && answeredByNew == victimFlows.count,
                           "\(answeredByNew) of \(victimFlows.count) flows of slot \(victim) answered by its new worker")
        return "\(flows) flows on predicted slots; slot \(victim)'s worker killed, replaced (pid \(before[victim]!) -> "
            + "\(after[victim]!)), 0 flows moved, all answered in \(restartMs) ms"
    }

    /// The data plane outlives its daemon: SIGKILL the daemon, every flow is still answered by the
    /// same worker; a second daemon on the same pins adopts every worker (same pids, through
    /// pidfd_open and pidfd_getfd) and no flow changes slot or worker.
    static let adoption = Check(
        "daemon-adopts-workers",
        "reuseportd SIGKILLed: its 4 workers serve on; a new daemon on the pins adopts them (same pids, same slots)"
    ) { context in
        let binary = try binary()
        let first = try TestDaemon(config: config, binary: binary, pinRoot: TestPinRoot.unique("kernel-check"), logLevel: nil)
        func failure(_ what: String) -> CheckFailure { CheckFailure(description: "\(what); daemon log: \(first.logTail())") }
        let services = try waitFor("every worker running", failure) { () -> [ServiceStatus]? in
            if let status = first.checkExited() { throw failure("reuseportd exited (status \(status))") }
            let services = try? first.status()
            return services?.first?.slots.allSatisfy({ $0.state == "running" && $0.pid != nil }) == true ? services : nil
        }
        let port = try Endpoint(parsing: services[0].listeners[0]).address.port
        let destination = SocketAddress(.loopbackV4, port)
        let clients = try Traffic.clients(flows, on: .loopbackV4)
        let before = try ask(clients, destination, round: 1)
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 10_000)
        let orphaned = try ask(clients, destination, round: 2)
        let second = try TestDaemon(config: config, binary: binary, pinRoot: first.pinRoot, logLevel: nil)
        defer { second.stop() }
        let adopted = try waitFor("the new daemon's workers", failure) { () -> ServiceStatus? in
            if let status = second.checkExited() { throw failure("the second reuseportd exited (status \(status))") }
            let service = try? second.status().first
            return service?.slots.allSatisfy({ $0.state == "running" && $0.pid != nil }) == true ? service : nil
        }
        let after = try ask(clients, destination, round: 3)
        func worker(_ answers: [SocketAddress: WhoamiReply], _ client: FlowClient) -> String? {
            answers[client.local].map { "\($0.slot)/\($0.pid)" }
        }
        let unanswered = clients.filter { orphaned[$0.local] == nil }.count
        let changed = clients.filter { worker(before, $0) != worker(orphaned, $0) || worker(before, $0) != worker(after, $0) }.count
        context.record("answered_without_daemon", "\(flows - unanswered)/\(flows)")
        context.record("adopted", adopted.adoptedWorkers ?? -1)
        context.record("flows_changed_worker", "\(changed)/\(flows)")
        try context.expect(before.count == flows && unanswered == 0, "\(unanswered) of \(flows) flows unanswered with no daemon")
        try context.expect(adopted.slots.map(\.pid) == services[0].slots.map(\.pid),
                           "worker pids \(services[0].slots.map(\.pid)) became \(adopted.slots.map(\.pid))")
        try context.expect(adopted.adoptedWorkers == Int(slots), "\(adopted.adoptedWorkers ?? 0) workers adopted")
        try context.expect(changed == 0, "\(changed) of \(flows) flows changed worker")
        return "\(flows) flows answered with no daemon; \(slots) workers adopted (same pids); 0 flows changed worker"
    }

    /// Sends one datagram per client (no second try) and reads each whoami answer, by client.
    static func ask(_ clients: [FlowClient], _ destination: SocketAddress, round: Int, timeoutMs: Int = 5000) throws
        -> [SocketAddress: WhoamiReply]
    {
        let replies = try Whoami.ask(clients, to: destination, attempts: 1, timeoutMs: timeoutMs) { _ in
            Array("round \(round)".utf8)
        }
        var answers: [SocketAddress: WhoamiReply] = [:]
        for (client, reply) in zip(clients, replies) { answers[client.local] = reply }
        return answers
    }

    /// Polls `probe` every 50 ms until it gives a value or `waitMs` passes.
    static func waitFor<T>(_ what: String, _ failure: (String) -> CheckFailure, _ probe: () throws -> T?) throws -> T {
        let deadline = MonotonicClock.milliseconds() + waitMs
        while MonotonicClock.milliseconds() < deadline {
            if let value = try probe() { return value }
            usleep(50_000)
        }
        throw failure("timed out after \(waitMs / 1000) s waiting for \(what)")
    }
}
