#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport

/// The daemon end to end: start reuseportd (the binary beside this one, or $REUSEPORTD)
/// with 4 whoami workers on a port it picks, learn the port from its log and the workers
/// from its pinned rp_slot_state, SIGKILL one worker, and check that every flow is
/// answered from the same slot before and after, the killed slot's by the new worker.
enum DaemonCheck {
    static let all: [Check] = [endToEnd]

    static let slots: UInt32 = 4
    static let flows = 64
    static let service = "kernelcheck"
    /// Generous: under software emulation a worker start takes a while.
    static let waitMs = 30_000

    static var daemonPath: String {
        if let path = getenv("REUSEPORTD") { return String(cString: path) }
        let me = Subprocess.selfPath
        return String(me[..<(me.lastIndex(of: "/") ?? me.startIndex)]) + "/reuseportd"
    }

    static let endToEnd = Check(
        "daemon-end-to-end",
        "reuseportd with 4 whoami workers: SIGKILL one, every flow keeps its slot (the replacement answers)"
    ) { context in
        let binary = daemonPath
        guard access(binary, X_OK) == 0 else {
            throw CheckSkip(description: "no reuseportd at \(binary) (build it beside kernel-check, or set REUSEPORTD)")
        }
        var template = Array("/tmp/kernel-check-daemon-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw CheckFailure(description: "mkdtemp: \(errnoName(errno))") }
        let directory = String(cString: made)
        defer { removeTree(directory) }
        let config = "\(directory)/reuseportd.toml"
        let log = "\(directory)/daemon.log"
        try writeFile(config, """
            [[service]]
            name = "\(service)"
            listen = ["udp://127.0.0.1:0"]
            workers = \(slots)
            builtin = "whoami"
            """)
        let layout = PinLayout(root: "/sys/fs/bpf/kernel-check-\(getpid())", service: service)
        let daemon = try Subprocess(binary, ["--config", config, "--pin-dir", layout.root, "--run-dir", "\(directory)/run"],
                                    outputFile: log)
        defer { stop(daemon) }
        func failure(_ what: String) -> CheckFailure {
            CheckFailure(description: "\(what); daemon log: \(readFile(log).split(separator: "\n").suffix(5).joined(separator: " | "))")
        }

        // "service kernelcheck listening on udp://127.0.0.1:PORT with 4 workers, ..."
        let prefix = "listening on udp://127.0.0.1:"
        let port = try waitFor("the daemon to report its port", failure) { () -> UInt16? in
            if let status = daemon.reap(timeoutMs: 0) { throw failure("reuseportd exited (\(status))") }
            let text = readFile(log)
            guard let range = text.firstRange(of: prefix) else { return nil }
            return UInt16(text[range.upperBound...].prefix { $0.isNumber })
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
        kill(pid_t(before[victim]!), SIGKILL)
        let killedAt = MonotonicClock.milliseconds()
        let second = try ask(clients, destination, round: 2, timeoutMs: waitMs)
        let restartMs = MonotonicClock.milliseconds() - killedAt
        let after = try waitFor("slot \(victim) running again", failure) { try workers() }
        let moved = clients.filter { first[$0.local]?.slot != second[$0.local]?.slot }.count
        let victimFlows = clients.filter { first[$0.local]?.slot == victim }
        let answeredByNew = victimFlows.filter { second[$0.local]?.pid == after[victim]! }.count
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

    /// Sends one datagram per client and reads each whoami answer: slot and pid per client.
    static func ask(_ clients: [FlowClient], _ destination: SocketAddress, round: Int, timeoutMs: Int = 5000) throws
        -> [SocketAddress: (slot: UInt32, pid: UInt32)]
    {
        for client in clients { try client.send(Array("round \(round)".utf8), to: destination) }
        let deadline = MonotonicClock.milliseconds() + timeoutMs
        var answers: [SocketAddress: (slot: UInt32, pid: UInt32)] = [:]
        for client in clients {
            let left = max(deadline - MonotonicClock.milliseconds(), 0)
            guard let reply = try client.receive(timeoutMs: Int32(left)) else { continue }
            // "slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>\n<payload>"
            var fields: [Substring: Substring] = [:]
            for field in String(decoding: reply.prefix { $0 != 0x0a }, as: UTF8.self).split(separator: " ") {
                if let equals = field.firstIndex(of: "=") { fields[field[..<equals]] = field[field.index(after: equals)...] }
            }
            if let slot = fields["slot"].flatMap({ UInt32($0) }), let pid = fields["pid"].flatMap({ UInt32($0) }) {
                answers[client.local] = (slot, pid)
            }
        }
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

    /// SIGTERM (graceful stop: workers, sockets, pins), SIGKILL if it takes too long.
    static func stop(_ daemon: Subprocess) {
        guard daemon.reap(timeoutMs: 0) == nil else { return }
        try? Syscall.kill(daemon.pid, SIGTERM)
        if daemon.reap(timeoutMs: 15_000) == nil {
            try? Syscall.kill(daemon.pid, SIGKILL)
            _ = daemon.reap(timeoutMs: 5000)
        }
    }

    static func writeFile(_ path: String, _ text: String) throws {
        try Syscall.writeFile(path, Array(text.utf8), mode: 0o600)
    }

    static func readFile(_ path: String) -> String {
        String(decoding: (try? Syscall.readFile(path)) ?? [], as: UTF8.self)
    }

    /// Removes the check's temporary folder: its files and the daemon's (emptied) run folder.
    static func removeTree(_ path: String) {
        for name in ["reuseportd.toml", "daemon.log"] { unlink("\(path)/\(name)") }
        rmdir("\(path)/run")
        rmdir(path)
    }
}
