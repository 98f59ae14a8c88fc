#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import Testing

/// The slot of every bucket, read from the pinned table.
func pinnedBuckets(_ daemon: TestDaemon, service: String) throws -> [UInt32] {
    try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: service)).readBuckets()
}

func udpEndpoint(_ services: [ServiceStatus], _ name: String) throws -> SocketAddress {
    guard let service = services.first(where: { $0.name == name }),
          let text = service.listeners.first(where: { $0.hasPrefix("udp://") })
    else { throw HarnessError("service \(name) has no UDP listener in \(services)") }
    return try Endpoint(parsing: text).address
}

/// One `[[service]]` table for a test configuration.
func serviceTable(_ name: String, listen: [String] = ["udp://127.0.0.1:0"], workers: Int,
                  program: String = "builtin = \"whoami\"", extra: String = "") -> String {
    """
    [[service]]
    name = "\(name)"
    listen = [\(listen.map { "\"\($0)\"" }.joined(separator: ", "))]
    workers = \(workers)
    \(program)
    \(extra)

    """
}

/// The sockets of `transport` that /proc/net/{udp,tcp}{,6} list: local port, inode and (UDP)
/// receive drops, the last column.
func procNetSockets(_ transport: Transport) -> [(port: UInt16, inode: Substring, drops: Int)] {
    (transport == .udp ? ["udp", "udp6"] : ["tcp", "tcp6"]).flatMap { table in
        ((try? String(contentsOfFile: "/proc/net/\(table)", encoding: .utf8)) ?? "").split(separator: "\n").dropFirst()
            .compactMap { line -> (port: UInt16, inode: Substring, drops: Int)? in
                let fields = line.split(separator: " ")
                guard fields.count >= 13, let colon = fields[1].lastIndex(of: ":"),
                      let port = UInt16(fields[1][fields[1].index(after: colon)...], radix: 16)
                else { return nil }
                return (port, fields[9], Int(fields[fields.count - 1]) ?? 0)
            }
    }
}

/// The kernel's receive drops of every UDP socket bound to one of `ports`: datagrams that did
/// not fit a socket's receive buffer.
func kernelUDPDrops(ports: Set<UInt16>) -> Int {
    procNetSockets(.udp).filter { ports.contains($0.port) }.reduce(0) { $0 + $1.drops }
}

/// Flows that each send numbered datagrams (`"<flow> <seq>"`) to a whoami service and read the
/// answers: which sequence numbers each flow got back.
final class NumberedFlows {
    let clients: [FlowClient]
    private(set) var answered: [Set<Int>]
    /// Per flow, the slot that answered each sequence number.
    private(set) var slotOf: [[Int: UInt32]]
    private var fds: [pollfd]

    init(_ clients: [FlowClient]) {
        self.clients = clients
        answered = Array(repeating: [], count: clients.count)
        slotOf = Array(repeating: [:], count: clients.count)
        fds = clients.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
    }

    /// Sends datagram `seq` on every flow.
    func send(_ seq: Int, to destination: SocketAddress) throws {
        for (flow, client) in clients.enumerated() { try client.send(Array("\(flow) \(seq)".utf8), to: destination) }
    }

    /// Reads answers until `deadline` (nowMs), or until every flow has `expected` of them;
    /// `onReply(flow, seq, reply)` sees each.
    func receive(until deadline: Double, orAll expected: Int? = nil,
                 _ onReply: (Int, Int, WhoamiReply) -> Void = { _, _, _ in }) throws {
        while nowMs() < deadline {
            if let expected, answered.allSatisfy({ $0.count >= expected }) { return }
            let wait = Int32(max(0, min(50, deadline - nowMs())))
            guard poll(&fds, nfds_t(fds.count), wait) > 0 else { continue }
            for flow in 0..<clients.count where fds[flow].revents & Int16(POLLIN) != 0 {
                fds[flow].revents = 0
                while let bytes = try clients[flow].receive(timeoutMs: 0) {
                    guard let reply = WhoamiReply(bytes) else { continue }
                    let fields = String(decoding: reply.payload, as: UTF8.self).split(separator: " ")
                    guard fields.count == 2, let seq = Int(fields[1]) else { continue }
                    answered[flow].insert(seq)
                    slotOf[flow][seq] = reply.slot
                    onReply(flow, seq, reply)
                }
            }
        }
    }

    /// The datagrams of rounds `0..<rounds` that got no answer, each with its flow, round and the
    /// slots that answered the flow's nearest rounds before and after it ("?" for none): where it
    /// was most likely steered.
    func unanswered(rounds: Int) -> [String] {
        clients.indices.flatMap { flow in
            (0..<rounds).filter { !answered[flow].contains($0) }.map { round -> String in
                let before = (0..<round).reversed().lazy.compactMap { self.slotOf[flow][$0] }.first
                let after = ((round + 1)..<max(round + 1, rounds)).lazy.compactMap { self.slotOf[flow][$0] }.first
                return "flow \(flow) (port \(clients[flow].local.port)) round \(round) between slots "
                    + "\(before.map(String.init) ?? "?") and \(after.map(String.init) ?? "?")"
            }
        }
    }
}

/// Flows that each send a numbered datagram every `periodMs` (200 ms by default) to a whoami
/// service, and who answered each: the `label` of every answer (by default "slot/pid").
final class Sessions {
    let numbered: NumberedFlows
    let periodMs: Double
    let label: (WhoamiReply) -> String
    /// Per flow, the labels of its answers: more than one means it changed worker.
    private(set) var answers: [Set<String>]
    private(set) var rounds = 0

    init(_ count: Int, periodMs: Double = 200, label: @escaping (WhoamiReply) -> String = { "\($0.slot)/\($0.pid)" })
        throws {
        numbered = NumberedFlows(try Traffic.clients(count, on: .loopbackV4))
        answers = Array(repeating: [], count: count)
        self.periodMs = periodMs
        self.label = label
    }

    /// Sends `count` rounds, one every `periodMs`, calling `atRound` before each; then waits up to
    /// 5 s for every answer.
    func run(_ count: Int, to destination: SocketAddress, atRound: (Int) throws -> Void = { _ in }) throws {
        let start = nowMs()
        let note = { (flow: Int, _: Int, reply: WhoamiReply) -> Void in self.answers[flow].insert(self.label(reply)) }
        for index in 0..<count {
            try atRound(rounds + index)
            try numbered.send(rounds + index, to: destination)
            try numbered.receive(until: start + Double(index + 1) * periodMs, note)
        }
        rounds += count
        try numbered.receive(until: nowMs() + 5000, orAll: rounds, note)
    }

    var lost: Int { numbered.answered.reduce(0) { $0 + rounds - $1.count } }
    /// For a failure message: the first lost datagrams (flow, round, the slots around it) and
    /// the first flows that changed worker, with their labels.
    var report: String {
        let unanswered = numbered.unanswered(rounds: rounds)
        let changed = moved.prefix(5).map { "flow \($0): \(answers[$0].sorted())" }
        return "\(unanswered.count) lost \(unanswered.prefix(5)); \(moved.count) moved \(changed)"
    }
    /// Flows answered by more than one worker.
    var moved: [Int] { answers.indices.filter { answers[$0].count != 1 } }
    /// The first field of each flow's first label (the slot, with the default label).
    var slots: [UInt32] { answers.map { UInt32($0.sorted().first!.split(separator: "/")[0]) ?? UInt32.max } }
}

/// Sends `rounds` rounds of `sessions` to `destination`, asking `daemon` to reexec itself before
/// round `at`; returns the first service's status as the new image reports it.
func reexec(_ daemon: TestDaemon, under sessions: Sessions, rounds: Int, at: Int, to destination: SocketAddress) throws
    -> ServiceStatus
{
    let before = try daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs
    var answer: ControlResponse?
    try sessions.run(rounds, to: destination) { round in
        if round == at { answer = try daemon.request(ControlRequest(command: .reexec)) }
    }
    #expect(answer?.ok == true, "\(String(describing: answer))")
    return try daemon.waitFor("the new image") { _ in
        (try? daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs) != before
    }[0]
}
