#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// `which` against a pinned service: its answer must be where the kernel delivered the datagram.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "pinning BPF maps and loading the program needs root"))
struct WhichTests {
    func answers(_ result: CtlResult) throws -> [[String: Any]] {
        #expect(result.status == 0, "\(result)")
        return try #require(try decodeJSON(result.stdout) as? [[String: Any]])
    }

    /// 200 client ports, IPv4 and IPv6: `which` names the slot that received each datagram.
    @Test(arguments: [IPAddress.loopbackV4, .loopbackV6])
    func agreesWithTheKernelFor200Clients(address: IPAddress) throws {
        let root = PinRoot("which-\(address.isV4 ? 4 : 6)")
        let service = try PinnedService(root: root, address: address, slots: 5, bucketCount: 256)
        let clients = try Traffic.clients(200, on: address)
        let landed = try sendAndReceive(clients, to: service)
        #expect(landed.count == 200)
        let result = try reuseportctl(["which", "--json", "--pin-dir", root.path] + clients.map { "\($0.local)" })
        let list = try answers(result)
        #expect(list.count == 200)
        for (client, answer) in zip(clients, list) {
            #expect(answer["client"] as? String == "\(client.local)")
            #expect(answer["slot"] as? Int == landed[client.local].map(Int.init), "\(client.local)")
            #expect(answer["fallback"] as? Bool == false)
        }
        #expect(Set(landed.values).count == 5)
    }

    /// TCP: the listener at the slot `which` names accepts each connection.
    @Test func agreesWithTheKernelForTCPConnections() throws {
        let root = PinRoot("which-tcp")
        let service = try PinnedService(root: root, transport: .tcp, slots: 4, bucketCount: 128)
        var accepted: [(SocketAddress, UInt32)] = []
        for _ in 0..<60 {
            let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
            try client.connect(to: service.endpoint.address)
            let (slot, peer) = try #require(try Traffic.acceptOne(from: service.plane.listeners[0].sockets))
            accepted.append((peer, slot))
        }
        let list = try answers(try reuseportctl(["which", "--json", "--proto", "tcp", "--pin-dir", root.path]
                                                + accepted.map { "\($0.0)" }))
        for ((peer, slot), answer) in zip(accepted, list) {
            #expect(answer["transport"] as? String == "tcp")
            #expect(answer["slot"] as? Int == Int(slot), "\(peer)")
        }
        #expect(Set(accepted.map(\.1)).count == 4)
    }

    /// A service with a UDP and a TCP listener: the dump shows each listener and each slot's two
    /// sockets; `which` needs --proto and then answers for that listener.
    @Test func twoListenersNeedProto() throws {
        let root = PinRoot("which-two")
        let service = try PinnedService(root: root, slots: 3, extraListeners: [Endpoint(.tcp, SocketAddress(.loopbackV4, 0))])
        let tcp = service.plane.listeners[1].endpoint
        let dump = try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path])
        #expect(dump.status == 0, "\(dump)")
        let svc = try #require((try decodeJSON(dump.stdout) as? [String: Any])?["services"] as? [[String: Any]]).first
        let listeners = try #require(svc?["listeners"] as? [[String: Any]])
        #expect(listeners.map { $0["endpoint"] as? String } == ["\(service.endpoint)", "\(tcp)"])
        for slot in try #require(svc?["slots"] as? [[String: Any]]) {
            let sockets = try #require(slot["sockets"] as? [[String: Any]])
            #expect(sockets.map { $0["listener"] as? Int } == [0, 1])
            #expect(sockets.allSatisfy { $0["inode"] is Int })
        }

        let ambiguous = try reuseportctl(["which", "127.0.0.1:4000", "--pin-dir", root.path])
        #expect(ambiguous.status == 1)
        #expect(ambiguous.stderr.contains("choose with --proto"), "\(ambiguous)")
        let answer = try #require(try answers(try reuseportctl(["which", "127.0.0.1:4000", "--proto", "tcp", "--json",
                                                                 "--pin-dir", root.path])).first)
        #expect(answer["listener"] as? Int == 1)
        #expect(answer["destination"] as? String == "\(tcp.address)")
        let expected = try service.plane.snapshot(listener: 1)
            .placement(of: FlowTuple(.tcp, from: try SocketAddress(parsing: "127.0.0.1:4000"), to: tcp.address))
        #expect(answer["slot"] as? Int == expected.slot.map(Int.init))
    }

    /// A slot without a socket: `which` says the flow falls back, and to the slot it really reaches.
    @Test func reportsFallbackToTheSlotTheKernelPicks() throws {
        let root = PinRoot("which-fallback")
        let service = try PinnedService(root: root, slots: 4, bucketCount: 64)
        try service.plane.closeSlot(2)
        let clients = try Traffic.clients(100, on: .loopbackV4)
        let landed = try sendAndReceive(clients, to: service)
        let list = try answers(try reuseportctl(["which", "--json", "--pin-dir", root.path]
                                                + clients.map { "\($0.local)" }))
        var fallbacks = 0
        for (client, answer) in zip(clients, list) {
            #expect(answer["slot"] as? Int == landed[client.local].map(Int.init))
            if answer["bucket_slot"] as? Int == 2 {
                fallbacks += 1
                #expect(answer["fallback"] as? Bool == true)
            }
        }
        #expect(fallbacks > 0, "some of 100 flows hash to slot 2's 16 buckets")
    }

    /// A wildcard listener: without --to the tool asks for it; with it, the answer matches.
    @Test func wildcardListenerNeedsTo() throws {
        let root = PinRoot("which-wildcard")
        let service = try PinnedService(root: root, address: IPAddress("0.0.0.0")!, slots: 3)
        let port = service.endpoint.address.port
        let refused = try reuseportctl(["which", "127.0.0.1:4000", "--pin-dir", root.path])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("wildcard address") && refused.stderr.contains("--to ADDR:\(port)"),
                "\(refused)")

        let clients = try Traffic.clients(20, on: .loopbackV4)
        for client in clients { try client.send([1], to: SocketAddress(.loopbackV4, port)) }
        let deliveries = try Traffic.receive(from: service.plane.listeners[0].sockets, expected: 20)
        let list = try answers(try reuseportctl(["which", "--json", "--to", "127.0.0.1:\(port)", "--pin-dir", root.path]
                                                + clients.map { "\($0.local)" }))
        for (client, answer) in zip(clients, list) {
            #expect(answer["slot"] as? Int == deliveries.first { $0.source == client.local }.map { Int($0.slot) })
        }
    }

    /// The human answer, exactly (its numbers are checked against the kernel by the tests above),
    /// for a direct hit and for a fallback.
    @Test func humanAnswerIsExact() throws {
        let root = PinRoot("which-text")
        let service = try PinnedService(root: root, name: "dns", slots: 3, seed: 0xabc, bucketCount: 12)
        for slot in 0..<UInt32(3) { try service.setState(slot, pid: 300 + slot, state: .running, since: 1) }
        let destination = service.endpoint.address
        let client = try SocketAddress(parsing: "198.51.100.7:40000")
        let direct = try service.plane.snapshot().placement(of: FlowTuple(.udp, from: client, to: destination))
        let slot = try #require(direct.slot)
        func hex(_ value: UInt32) -> String {
            let digits = String(value, radix: 16)
            return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
        }
        let head = "udp 198.51.100.7:40000 -> \(destination)  (service dns, listener 0: \(service.endpoint))\n"
            + "  hash    \(hex(direct.hash))  (seed 0x00000abc)\n"
        let hit = try reuseportctl(["which", "198.51.100.7:40000", "--pin-dir", root.path])
        #expect(hit.status == 0, "\(hit)")
        #expect(hit.stdout == head + "  bucket  \(direct.bucket) of 12 -> slot \(slot)\n"
                + "  slot    \(slot)  socket cookie \(try service.cookie(slot))\n"
                + "  worker  pid \(300 + slot), running, generation 1 (working)\n")

        try service.plane.closeSlot(slot)
        let fallback = try #require(try service.plane.snapshot().placement(of: FlowTuple(.udp, from: client, to: destination)).slot)
        let moved = try reuseportctl(["which", "198.51.100.7:40000", "--pin-dir", root.path])
        #expect(moved.status == 0, "\(moved)")
        #expect(moved.stdout == head + "  bucket  \(direct.bucket) of 12 -> slot \(slot), which has no socket: falls back\n"
                + "  slot    \(fallback) (fallback)  socket cookie \(try service.cookie(fallback))\n"
                + "  worker  pid \(300 + fallback), running, generation 1 (working)\n")
    }

    /// Bad addresses are argument errors (exit 2) that say what is wrong.
    @Test func badAddressesAreArgumentErrors() throws {
        let noPort = try reuseportctl(["which", "10.0.0.1"])
        #expect(noPort.status == 2)
        #expect(noPort.stderr.contains("'10.0.0.1': expected ADDR:PORT"), "\(noPort)")
        let badTo = try reuseportctl(["which", "10.0.0.1:5", "--to", "[::1]"])
        #expect(badTo.status == 2)
        #expect(badTo.stderr.contains("--to"), "\(badTo)")
        let badProto = try reuseportctl(["which", "10.0.0.1:5", "--proto", "sctp"])
        #expect(badProto.status == 2)
        #expect(badProto.stderr.contains("sctp"), "\(badProto)")
    }
}
