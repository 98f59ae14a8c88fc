#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import Testing

/// Pins in states a running daemon does not leave, but a crashed one, another version or a
/// hand-edited map can: the tool says what it sees and never crashes or guesses.
@Suite(.serialized, .enabled(if: isRoot, "the tests pin BPF maps: needs root"))
struct OddPinTests {
    /// A configuration whose bucket_count the program refuses (0, or above RP_MAX_BUCKETS): the
    /// program drops every packet, and `which` says so instead of dividing by zero or naming a slot.
    @Test(arguments: [UInt32(0), UInt32(RP_MAX_BUCKETS) + 1])
    func whichWithABucketCountTheProgramRefuses(buckets: UInt32) throws {
        let root = PinRoot("odd-buckets-\(buckets)")
        let service = try PinnedService(root: root, slots: 4, bucketCount: 64)
        try service.plane.maps.config.update(0, rp_config(abi_version: UInt32(RP_ABI_VERSION), seed: 0x5eed,
                                                          bucket_count: buckets, slot_count: 4))
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
}
