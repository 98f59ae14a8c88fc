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

/// Operations one after the other, as operators and failures bring them: random sequences of
/// scale, upgrade, rollback, reload, a worker's SIGKILL, the daemon's SIGKILL and a new start on
/// its pins, and `reexec`, on one service with UDP and TCP listeners on 127.0.0.1 and UDP on [::1], while 64 + 16 UDP
/// flows send and 8 TCP connections stay open. Each feature holds alone (their own suites); this
/// is about what follows what.
///
/// After every step (`ChaosRun.check`):
/// - no live UDP flow changed slot and none lost a datagram (every round is answered before the
///   next operation that kills a process);
/// - every TCP connection answers from the worker that accepted it, unless that worker was the
///   one killed;
/// - every process that holds a socket on the port is the daemon or a worker its status names;
/// - the pins name the same workers as the status (rp_slot_state, pid and start time);
/// and after the final graceful stop, no process holds the port and it binds again.
///
/// `CHAOS_SEED` replays a sequence (each failure prints its seed; the operations drawn also depend
/// on how many slots a step found, so a replay is exact while the daemon answers alike),
/// `CHAOS_STEPS` sets its length, `CHAOS_SECONDS` runs sequences until that much time has passed
/// (30 s by default, `make chaos` 600). It runs alone: "no datagram lost" holds below saturation,
/// and other tests' daemons beside it can saturate the workers.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ChaosTests {
    @Test(.alone) func randomSequencesKeepEveryFlowOnItsWorker() throws {
        let environment = ProcessInfo.processInfo.environment
        // `make test`: sequences for 30 s (at least one); `make chaos`: 10 minutes.
        let seconds = environment["CHAOS_SECONDS"].flatMap(Double.init) ?? 30
        let steps = environment["CHAOS_STEPS"].flatMap(Int.init) ?? 10
        var seed = environment["CHAOS_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        let end = nowMs() + seconds * 1000
        var totals = ChaosTotals()
        repeat {
            let run = try ChaosRun(seed: seed)
            do {
                try run.play(steps: steps)
            } catch {
                run.fail("\(error)")
            }
            totals.add(run)
            if !run.violations.isEmpty {
                Issue.record("seed \(seed) (CHAOS_SEED=\(seed) replays it): \(run.violations.count) violations after \(run.steps.joined(separator: ", ")): \(run.violations.prefix(8).joined(separator: "; ")); daemon logs: \(run.keptLogs())")
                break
            }
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        } while nowMs() < end
        print("chaos: \(totals)")
    }
}

/// The figures of every sequence run.
struct ChaosTotals: CustomStringConvertible {
    var sequences = 0, steps = 0, refused = 0, violations = 0, moved = 0, lost = 0, left = 0, datagrams = 0
    var byOperation: [String: Int] = [:]

    mutating func add(_ run: ChaosRun) {
        sequences += 1
        steps += run.steps.count
        refused += run.refused
        violations += run.violations.count
        moved += run.movedFlows
        lost += run.lostDatagrams
        left += run.processesLeft
        datagrams += run.sentDatagrams
        for step in run.steps { byOperation[String(step.prefix { $0 != " " }), default: 0] += 1 }
    }

    var description: String {
        "\(sequences) sequences, \(steps) steps (\(byOperation.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")); \(refused) refused), \(violations) violations, \(moved) live flows moved, \(lost) of \(datagrams) datagrams lost, \(left) processes left after stop"
    }
}

/// One sequence on one service: its daemons (a killed one is kept, not deinitialised, until the
/// end: its deinit kills the workers its pins name, which the next daemon adopted), its flows, its
/// connections and what was found.
final class ChaosRun {
    /// `newFlows`: the live flows end and new ones start; the old ones' records go idle, so that
    /// changes finish and older generations retire (a completed upgrade, then what follows it).
    enum Operation: CaseIterable { case scale, upgrade, rollback, reload, killWorker, killDaemon, reexec, newFlows }

    static let service = "chaos"
    static let flows = 64
    static let connections = 8

    private var random: SeededRandom
    /// The ports the first daemon bound. The configuration asks for port 0 throughout (a port
    /// picked here could be taken by another test's socket before the daemon binds it): a daemon
    /// started on the pins keeps the adopted sockets' port, and a reload keeps the running one.
    private var udpPort: UInt16 = 0, udp6Port: UInt16 = 0, tcpPort: UInt16 = 0
    private var workers = 4
    private var daemons: [TestDaemon] = []
    private var daemon: TestDaemon { daemons[daemons.count - 1] }
    /// The live flows: `flows` over IPv4, then `flows / 4` over IPv6 (the service's third listener).
    private var numbered: NumberedFlows
    private var numbered6: NumberedFlows
    /// Each flow's slot, from its first answer (IPv6 flows after the IPv4 ones).
    private var slotOf: [Int: UInt32] = [:]
    private var rounds = 0
    /// Datagrams sent and lost by the flows that ended (`newFlows`).
    private var endedSent = 0, endedLost = 0
    /// Open TCP connections and the pid of the worker that answered each first.
    private var tcp: [(client: FlowClient, pid: Int32)] = []

    private(set) var steps: [String] = []
    private(set) var violations: [String] = []
    private(set) var refused = 0
    private(set) var movedFlows = 0
    private(set) var processesLeft = 0
    var lostDatagrams: Int {
        endedLost + (numbered.answered + numbered6.answered).reduce(0) { $0 + rounds - $1.count }
    }
    var sentDatagrams: Int { endedSent + rounds * (Self.flows + Self.flows / 4) }

    init(seed: UInt64) throws {
        random = SeededRandom(seed: seed)
        numbered = NumberedFlows(try Traffic.clients(Self.flows, on: .loopbackV4))
        numbered6 = NumberedFlows(try Traffic.clients(Self.flows / 4, on: .loopbackV6))
        let first = try TestDaemon(config: config())
        daemons.append(first)
        let listeners = try first.waitFor("the listeners") { !$0.isEmpty }[0].listeners
            .compactMap { try? Endpoint(parsing: $0) }
        udpPort = listeners.first { $0.transport == .udp && $0.address.address.family == AF_INET }?.address.port ?? 0
        udp6Port = listeners.first { $0.transport == .udp && $0.address.address.family == AF_INET6 }?.address.port ?? 0
        tcpPort = listeners.first { $0.transport == .tcp }?.address.port ?? 0
    }

    func config() -> String {
        serviceTable(Self.service, listen: ["udp://127.0.0.1:0", "tcp://127.0.0.1:0", "udp://[::1]:0"],
                     workers: workers, extra: "rcvbuf = 8388608\nflow_idle_timeout_ms = 1000")
    }

    var udp: SocketAddress { SocketAddress(.loopbackV4, udpPort) }
    var holders: Set<pid_t> {
        processesHolding(port: udpPort, .udp).union(processesHolding(port: udp6Port, .udp))
            .union(processesHolding(port: tcpPort, .tcp))
    }

    func play(steps count: Int) throws {
        try settle("start")
        for _ in 0..<Self.connections { try openConnection() }
        try round()
        for _ in 0..<count {
            guard violations.isEmpty else { break }
            let operation = Operation.allCases.randomElement(using: &random)!
            try apply(operation)
        }
        try stop()
    }

    /// Applies one operation while a round of datagrams is on its way (those that kill a process
    /// come between rounds, once every datagram was answered: a worker killed holding one in hand
    /// loses it, which is no fault of the daemon), then checks.
    private func apply(_ operation: Operation) throws {
        switch operation {
        case .scale:
            workers = Int.random(in: 2...6, using: &random)
            note("scale \(workers)", try daemon.request(ControlRequest(command: .scale, service: Self.service, workers: workers)))
        case .upgrade:
            note("upgrade", try daemon.request(ControlRequest(command: .upgrade, service: Self.service)))
        case .rollback:
            note("rollback", try daemon.request(ControlRequest(command: .upgrade, service: Self.service, rollback: true)))
        case .reload:
            workers = Int.random(in: 2...6, using: &random)
            try daemon.rewriteConfig(config())
            note("reload \(workers)", try daemon.request(ControlRequest(command: .reload)))
        case .killWorker:
            let slots = try daemon.status()[0].slots.filter { $0.pid != nil }
            guard let victim = slots.randomElement(using: &random), let pid = victim.pid else { return }
            steps.append("killWorker slot \(victim.slot)")
            kill(pid, SIGKILL)
            // Its connections end with it: replaced by new ones.
            let lost = tcp.indices.filter { tcp[$0].pid == pid }
            tcp.removeAll { $0.pid == pid }
            // Until the daemon has reaped it, the status still names the killed worker as running:
            // settling then would check the next step against a dead worker.
            do {
                try daemon.waitFor("the daemon saw pid \(pid) of slot \(victim.slot) die", timeoutMs: 30_000) { services in
                    services[0].slots.first { $0.slot == victim.slot }?.pid != pid
                }
            } catch {
                violations.append("after killWorker slot \(victim.slot): \(String("\(error)".prefix(300)))")
            }
            try settle("worker of slot \(victim.slot) killed")
            for _ in lost { try openConnection() }
        case .killDaemon:
            steps.append("killDaemon")
            daemon.signal(SIGKILL)
            _ = daemon.waitForExit(timeoutMs: 5000)
            try round()
            daemons.append(try TestDaemon(config: config(), pinRoot: daemon.pinRoot))
        case .newFlows:
            steps.append("newFlows")
            endedLost = lostDatagrams
            endedSent = sentDatagrams
            numbered = NumberedFlows(try Traffic.clients(Self.flows, on: .loopbackV4))
            numbered6 = NumberedFlows(try Traffic.clients(Self.flows / 4, on: .loopbackV6))
            slotOf = [:]
            rounds = 0
            // The new flows stay live (a round every 200 ms) past the old ones' idle timeout.
            for _ in 0..<8 {
                try round()
                sleepMs(200)
            }
        case .reexec:
            steps.append("reexec")
            let before = try daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs
            let answer = try daemon.request(ControlRequest(command: .reexec))
            if !answer.ok {
                refused += 1
                steps[steps.count - 1] += " (refused: \(answer.error ?? "?"))"
            } else {
                try daemon.waitFor("the new image") { _ in
                    (try? self.daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs) != before
                }
            }
        }
        try settle(steps.last ?? "?")
        try round()
        try check(after: steps.last ?? "?")
    }

    /// A failure of the harness itself (a refused connect, a daemon that did not answer), named
    /// with the step it followed.
    func fail(_ error: String) {
        violations.append("after \(steps.last ?? "the start"): \(error)")
    }

    private func note(_ step: String, _ response: ControlResponse) {
        steps.append(response.ok ? step : "\(step) (refused: \(response.error ?? "?"))")
        if !response.ok { refused += 1 }
    }

    /// Waits until every slot the status lists has a running worker.
    private func settle(_ after: String) throws {
        do {
            try daemon.waitFor("every slot running after \(after)", timeoutMs: 30_000) { services in
                services.allSatisfy { $0.slots.allSatisfy { $0.pid != nil && $0.state == "running" } }
            }
        } catch {
            violations.append("after \(after): \(String("\(error)".prefix(300)))")
        }
    }

    /// One numbered datagram on every flow, every answer awaited (up to 10 s).
    private func round() throws {
        try numbered.send(rounds, to: udp)
        try numbered6.send(rounds, to: SocketAddress(.loopbackV6, udp6Port))
        rounds += 1
        for (offset, flows) in [(0, numbered), (Self.flows, numbered6)] {
            try flows.receive(until: nowMs() + 10_000, orAll: rounds) { index, _, reply in
                let flow = offset + index
                if let first = self.slotOf[flow], first != reply.slot {
                    self.movedFlows += 1
                    self.violations.append("flow \(flow) moved from slot \(first) to \(reply.slot) at \(self.steps.last ?? "the start")")
                }
                if self.slotOf[flow] == nil { self.slotOf[flow] = reply.slot }
            }
        }
    }

    private func openConnection() throws {
        let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
        try client.connect(to: SocketAddress(.loopbackV4, tcpPort))
        guard let reply = try ask(client) else {
            violations.append("a new TCP connection got no answer")
            return
        }
        tcp.append((client, reply.pid))
    }

    private func ask(_ client: FlowClient) throws -> WhoamiReply? {
        try client.send(Array("ping\n".utf8), to: SocketAddress(.loopbackV4, tcpPort))
        return try client.receive(timeoutMs: 5000).flatMap { WhoamiReply($0) }
    }

    /// The invariants, read from outside: flows (checked in `round`), connections, the processes
    /// on the port, the pins.
    private func check(after step: String) throws {
        for flows in [numbered, numbered6] where flows.answered.contains(where: { $0.count < rounds }) {
            violations.append("after \(step): \(flows.unanswered(rounds: rounds).prefix(5)) unanswered")
        }
        for (index, connection) in tcp.enumerated() {
            let reply = try? ask(connection.client)
            if reply?.pid != connection.pid {
                violations.append("after \(step): TCP connection \(index) of worker \(connection.pid) "
                    + (reply.map { "answered by \($0.pid)" } ?? "closed or silent"))
            }
        }
        let status = try daemon.status()[0]
        let known = Set(status.slots.compactMap(\.pid)).union((status.leaving ?? []).map(\.pid)).union([daemon.pid])
        let unknown = holders.subtracting(known).subtracting([getpid()])
        if !unknown.isEmpty {
            violations.append("after \(step): processes \(unknown.sorted()) hold the service's ports but the status names "
                + "only \(known.sorted()) (daemon, workers, leaving workers)")
        }
        if let global = try? DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: Self.service)).globalCounters(),
           global.dropped_no_slot + global.select_errors + global.migrate_failed > 0 {
            violations.append("after \(step): the program dropped \(global.dropped_no_slot) packets for want of a slot, "
                + "\(global.select_errors) select errors, \(global.migrate_failed) failed migrations")
        }
        for broken in status.invariantViolations ?? [] {
            violations.append("after \(step): the placement's invariant is broken: \(broken)")
        }
        let pinned = Set(daemon.pinnedWorkers()[Self.service] ?? [])
        let listed = Set(status.slots.compactMap(\.pid))
        if pinned != listed {
            violations.append("after \(step): the pins name workers \(pinned.sorted()), the status \(listed.sorted())")
        }
    }

    /// A graceful stop; then nothing may hold the port, and it binds again without SO_REUSEPORT.
    private func stop() throws {
        steps.append("stop")
        tcp.removeAll()
        let status = daemon.stop(timeoutMs: 30_000)
        if status != 0 { violations.append("stop: the daemon exited with \(status.map(String.init) ?? "nothing")") }
        let deadline = nowMs() + 10_000
        var left = holders.subtracting([getpid()])
        while !left.isEmpty, nowMs() < deadline {
            sleepMs(50)
            left = holders.subtracting([getpid()])
        }
        processesLeft = left.count
        if !left.isEmpty { violations.append("after stop: processes \(left.sorted()) still hold the service's ports") }
        for (transport, port) in [(Transport.udp, udpPort), (.tcp, tcpPort)] where !canBind(transport, port) {
            violations.append("after stop: \(transport) port \(port) does not bind again")
        }
    }

    func keptLogs() -> [String] { daemons.map { $0.keepLog() } }
}

/// Whether a socket without SO_REUSEPORT binds `port` on 127.0.0.1 now (TCP with SO_REUSEADDR,
/// as servers bind: connections in TIME_WAIT on the port do not count).
func canBind(_ transport: Transport, _ port: UInt16) -> Bool {
    guard let socket = try? Syscall.socket(AF_INET, transport.socketType, "\(transport)") else { return false }
    if transport == .tcp { try? Syscall.setOption(socket.fd.rawValue, SOL_SOCKET, SO_REUSEADDR, Int32(1), "SO_REUSEADDR") }
    return (try? Syscall.bind(socket.fd, SocketAddress(.loopbackV4, port), "\(transport) port \(port)")) != nil
}

/// The processes with a `transport` socket whose local port is `port` (`procNetSockets`,
/// then every process's descriptors).
func processesHolding(port: UInt16, _ transport: Transport) -> Set<pid_t> {
    let inodes = Set(procNetSockets(transport).filter { $0.port == port }.map { "socket:[\($0.inode)]" })
    var holders = Set<pid_t>()
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
        guard let pid = pid_t(entry) else { continue }
        for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? [] {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"),
               inodes.contains(target) {
                holders.insert(pid)
                break
            }
        }
    }
    return holders
}

/// SplitMix64: the same sequence for the same seed, so that a printed seed replays a run.
struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
