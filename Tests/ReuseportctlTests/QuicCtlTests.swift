#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// reuseportctl on a pinned service with QUIC steering: `which --quic-dcid` names the slot the
/// kernel delivered to, and the dump, stats and Prometheus views show the program's counters.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "pinning BPF maps and loading the program needs root"))
struct QuicCtlTests {
    /// Short headers and Initials: `which --quic-dcid` agrees with where the datagrams landed.
    @Test func whichAgreesWithTheKernel() throws {
        let root = PinRoot("quic-which")
        let service = try PinnedService(root: root, slots: 4, bucketCount: 256, quic: QuicScenario.steering)
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let sockets = service.plane.listeners[0].sockets
        for slot in service.plane.slots {
            let dcid = QuicScenario.steering.connectionID(slot: slot, nonce: [1, 2, 3, 4, 5, 6, 7, 8])
            try client.send(QuicHeader.short(dcid: dcid), to: service.endpoint.address)
            let landed = try #require(try Traffic.receive(from: sockets, expected: 1).first).slot
            let result = try reuseportctl(["which", "--json", "--pin-dir", root.path, "--quic-dcid",
                                           QuicSteering.hex(dcid)])
            #expect(result.status == 0, "\(result)")
            let answer = try #require(try decodeJSON(result.stdout) as? [String: Any])
            let short = try #require(answer["short_header"] as? [String: Any])
            #expect(short["by"] as? String == "cid" && short["slot"] as? Int == Int(landed) && landed == slot)
        }
        for index in 0..<16 {
            let dcid = (0..<8).map { UInt8(truncatingIfNeeded: $0 * 31 + index * 7) }
            try client.send(QuicHeader.initial(dcid: dcid), to: service.endpoint.address)
            let landed = try #require(try Traffic.receive(from: sockets, expected: 1).first).slot
            let result = try reuseportctl(["which", "--pin-dir", root.path, "--quic-dcid", QuicSteering.hex(dcid)])
            #expect(result.status == 0, "\(result)")
            #expect(result.stdout.contains("long header   slot \(landed)"), "\(result)")
        }
        // A CID naming a slot without a socket goes by flow: with the client given, its slot.
        try service.plane.closeSlot(2)
        let stale = QuicScenario.steering.connectionID(slot: 2)
        try client.send(QuicHeader.short(dcid: stale), to: service.endpoint.address)
        let landed = try #require(try Traffic.receive(from: service.plane.listeners[0].sockets, expected: 1).first).slot
        let result = try reuseportctl(["which", "--pin-dir", root.path, "--quic-dcid", QuicSteering.hex(stale),
                                       "\(client.local)"])
        #expect(result.stdout.contains("its server ID names slot 2, which has no socket"), "\(result)")
        #expect(result.stdout.contains("from \(client.local): slot \(landed)"), "\(result)")
    }

    /// The counters the program wrote, in every view.
    @Test func countersInDumpStatsAndPrometheus() throws {
        let root = PinRoot("quic-counters")
        let service = try PinnedService(root: root, slots: 2, quic: QuicScenario.steering)
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        for _ in 0..<3 {
            try client.send(QuicHeader.short(dcid: QuicScenario.steering.connectionID(slot: 1)), to: service.endpoint.address)
        }
        try client.send(QuicHeader.initial(dcid: [9, 8, 7, 6, 5, 4, 3, 2]), to: service.endpoint.address)
        try client.send([0x40, 1, 2], to: service.endpoint.address)
        #expect(try Traffic.receive(from: service.plane.listeners[0].sockets, expected: 4).count == 4)

        let dump = try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path])
        let object = try #require(try decodeJSON(dump.stdout) as? [String: Any])
        let svc = try #require((object["services"] as? [[String: Any]])?.first)
        let quic = try #require(svc["quic"] as? [String: Any])
        #expect(quic["cid_length"] as? Int == 12 && quic["host_prefix"] as? String == "2a")
        #expect(quic["cid_steered"] as? Int == 3 && quic["initials"] as? Int == 1 && quic["unparsable"] as? Int == 1)
        let slots = try #require(svc["slots"] as? [[String: Any]])
        let slot1 = try #require(slots.first { $0["slot"] as? Int == 1 }?["quic"] as? [String: Any])
        #expect(slot1["cid_steered"] as? Int == 3 && slot1["server_id"] as? String == "2a0001")

        let text = try reuseportctl(["map", "dump", "--pin-dir", root.path]).stdout
        #expect(text.contains("cid_steered 3  initials 1"), "\(text)")
        let stats = try reuseportctl(["stats", "--pin-dir", root.path]).stdout
        #expect(stats.contains("quic by cid per slot: 0=0 1=3"), "\(stats)")
        let prometheus = try reuseportctl(["stats", "--prometheus", "--pin-dir", root.path]).stdout
        #expect(prometheus.contains("reuseport_quic_cid_steered_total{service=\"svc\"} 3"), "\(prometheus)")
        #expect(prometheus.contains("reuseport_slot_quic_cid_steered_total{service=\"svc\",slot=\"1\"} 3"))
        #expect(prometheus.contains("reuseport_quic_unparsable_total{service=\"svc\"} 1"))
    }

    @Test func aServiceWithoutQuicSaysSo() throws {
        let root = PinRoot("quic-off")
        let service = try PinnedService(root: root, slots: 2)
        let result = try withExtendedLifetime(service) {
            try reuseportctl(["which", "--pin-dir", root.path, "--quic-dcid", "00112233445566778899aabb"])
        }
        #expect(result.status != 0 && result.stderr.contains("does not steer QUIC by connection ID"), "\(result)")
    }
}
