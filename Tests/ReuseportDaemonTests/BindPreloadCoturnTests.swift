#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// A STUN Binding exchange (RFC 8489): the request a client sends to learn its address as the
/// server sees it, and the answer's XOR-MAPPED-ADDRESS port. The same bytes over UDP and TCP.
enum StunBinding {
    static let magicCookie: [UInt8] = [0x21, 0x12, 0xa4, 0x42]

    /// A Binding request (type 0x0001, no attributes) with this transaction ID.
    static func request(_ transaction: [UInt8]) -> [UInt8] { [0x00, 0x01, 0x00, 0x00] + magicCookie + transaction }

    /// The mapped port of a Binding success response (0x0101) to `transaction`, nil for anything else.
    static func mappedPort(_ answer: [UInt8], transaction: [UInt8]) -> UInt16? {
        guard answer.count >= 20, answer[0] == 0x01, answer[1] == 0x01, Array(answer[8..<20]) == transaction else {
            return nil
        }
        var at = 20
        while at + 4 <= answer.count {
            let type = Int(answer[at]) << 8 | Int(answer[at + 1]), length = Int(answer[at + 2]) << 8 | Int(answer[at + 3])
            // XOR-MAPPED-ADDRESS: reserved, family, then the port xor the cookie's first half.
            if type == 0x0020, length >= 4, at + 8 <= answer.count {
                return (UInt16(answer[at + 6]) << 8 | UInt16(answer[at + 7])) ^ 0x2112
            }
            at += 4 + (length + 3) / 4 * 4
        }
        return nil
    }
}

/// A second server that binds its own sockets, for another protocol: Debian's coturn (STUN/TURN),
/// unmodified, as 2 workers on a UDP and a TCP listener through `preload_bind`. Every Binding
/// request is answered with the client's own port (coturn parsed it), and each went through the
/// steering program (the per-slot counters count exactly what was sent) to both slots.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct BindPreloadCoturnTests {
    @Test func coturnAnswersStunOnTheSlotsSockets() throws {
        let port = try freePort()
        let server = SocketAddress(.loopbackV4, port)
        // -n: no configuration file; no TLS/DTLS listeners (their ports are no listener of the service).
        let argv = ["/usr/bin/turnserver", "-n", "--listening-ip=127.0.0.1", "--listening-port=\(port)", "--no-tls",
                    "--no-dtls", "--no-cli", "--log-file=stdout", "--simple-log", "--pidfile=",
                    "--relay-threads=2"]
        let daemon = try TestDaemon(
            config: serviceTable("turn", listen: ["udp://127.0.0.1:\(port)", "tcp://127.0.0.1:\(port)"], workers: 2,
                                 program: "exec = [" + argv.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
                                 extra: "preload_bind = true"),
            environment: try PreloadLibrary.daemonEnvironment())
        try daemon.waitForWorkers()
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "turn"))
        func counters() throws -> [UInt64] { try (0..<UInt32(2)).map { try maps.slotCounters($0).packets } }
        // coturn opens its listeners a moment after it starts: ask until one answers.
        let probe = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let deadline = nowMs() + 10_000
        var ready = false
        while !ready, nowMs() < deadline {
            let transaction = (0..<12).map { _ in UInt8.random(in: 0...255) }
            try probe.send(StunBinding.request(transaction), to: server)
            ready = try probe.receive(timeoutMs: 200).flatMap { StunBinding.mappedPort($0, transaction: transaction) } != nil
        }
        try #require(ready, "coturn never answered: \(daemon.logTail(10))")

        let before = try counters()
        let clients = try Traffic.clients(32, on: .loopbackV4)
        var answered = 0
        for client in clients {
            let transaction = (0..<12).map { _ in UInt8.random(in: 0...255) }
            try client.send(StunBinding.request(transaction), to: server)
            let mapped = try client.receive(timeoutMs: 5000).flatMap { StunBinding.mappedPort($0, transaction: transaction) }
            #expect(mapped == client.local.port, "client on port \(client.local.port): mapped \(String(describing: mapped))")
            if mapped != nil { answered += 1 }
        }
        var tcpAnswered = 0
        for _ in 0..<4 {
            let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
            try client.connect(to: server)
            let transaction = (0..<12).map { _ in UInt8.random(in: 0...255) }
            try client.send(StunBinding.request(transaction), to: server)
            let mapped = try client.receive(timeoutMs: 5000).flatMap { StunBinding.mappedPort($0, transaction: transaction) }
            #expect(mapped == client.local.port, "TCP client on port \(client.local.port): \(String(describing: mapped))")
            if mapped != nil { tcpAnswered += 1 }
        }
        let steered = zip(try counters(), before).map { $0 - $1 }
        print("coturn: \(answered) of 32 UDP and \(tcpAnswered) of 4 TCP Binding requests answered; steered per slot \(steered)")
        #expect(answered == 32 && tcpAnswered == 4)
        #expect(steered.reduce(0, +) == 36, "every request went through the steering program: \(steered)")
        #expect(steered.allSatisfy { $0 > 0 }, "both slots served: \(steered)")
        #expect(daemon.stop() == 0)
    }
}
