#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Pins in states a running daemon does not leave, but a crashed one, another version or a
/// hand-edited map can: the tool says what it sees and never crashes or guesses.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the tests pin BPF maps: needs root"))
struct OddPinTests {
    /// A configuration whose bucket_count the program refuses (0, or above RP_MAX_BUCKETS): the
    /// program drops every packet, and `which` says so instead of dividing by zero or naming a slot.
    @Test(arguments: [UInt32(0), UInt32(RP_MAX_BUCKETS) + 1])
    func whichWithABucketCountTheProgramRefuses(buckets: UInt32) throws {
        let root = PinRoot("odd-buckets-\(buckets)")
        let service = try PinnedService(root: root, slots: 4, bucketCount: 64)
        try service.plane.maps.config.update(0, rp_config(abi_version: UInt32(RP_ABI_VERSION), seed: 0x5eed,
                                                          bucket_count: buckets, slot_count: 4, live_count: 4,
                                                          record_cost_ns: 0, flags: 0, reserved: 0,
                                                          quic: rp_quic_config()))
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try client.send(Array("dropped".utf8), to: service.endpoint.address)
        let arrived = try Traffic.receive(from: service.plane.listeners[0].sockets, expected: 1, idleMs: 300)
        #expect(arrived.isEmpty, "the program drops the datagram")
        #expect(try service.plane.maps.globalCounters().dropped_no_slot == 1)

        let which = try reuseportctl(["which", "--pin-dir", root.path, "\(client.local)"])
        #expect(which.status == 1 && which.stderr.contains("bucket_count \(buckets)")
                && which.stderr.contains("drops every packet"), "\(which)")
        let dump = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(dump.status == 0 && dump.stdout.contains("buckets \(buckets)"), "\(dump)")
    }

    /// The daemon's IPv6 sockets are v6-only: an IPv6 wildcard listener takes no IPv4 client, and
    /// `which` must not place one there. A dual-stack one (IPV6_V6ONLY off) does, as IPv4 flows.
    @Test func anIPv6WildcardListenerTakesIPv4ClientsOnlyWhenDualStack() throws {
        for v6Only in [true, false] {
            let root = PinRoot("which-v6only-\(v6Only)")
            let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(IPAddress("::")!, 0))], slotCount: 3,
                                             options: .init(bucketCount: 64, seed: 0x5eed, v6Only: v6Only))
            let layout = PinLayout(root: root.path, service: "svc")
            try plane.pin(layout)
            defer {
                plane.close()
                layout.remove()
            }
            let port = plane.listeners[0].endpoint.address.port
            let clients = try Traffic.clients(20, on: .loopbackV4)
            for client in clients { try client.send([1], to: SocketAddress(.loopbackV4, port)) }
            let deliveries = try Traffic.receive(from: plane.listeners[0].sockets, expected: 20, idleMs: 300)
            let which = try reuseportctl(["which", "--json", "--to", "127.0.0.1:\(port)", "--pin-dir", root.path]
                                         + clients.map { "\($0.local)" })
            if v6Only {
                #expect(deliveries.isEmpty, "a v6-only socket gets no IPv4 datagram")
                #expect(which.status == 1 && which.stderr.contains("takes IPv4"), "\(which)")
            } else {
                #expect(deliveries.count == 20)
                #expect(which.status == 0, "\(which)")
                let list = try #require(try decodeJSON(which.stdout) as? [[String: Any]], "\(which)")
                for (client, answer) in zip(clients, list) {
                    // The dual-stack socket sees the IPv4 client as an IPv4-mapped IPv6 address.
                    let delivery = deliveries.first { SocketAddress($0.source.address.unmapped, $0.source.port) == client.local }
                    #expect(answer["slot"] as? Int == delivery.map { Int($0.slot) })
                }
            }
        }
    }
}
