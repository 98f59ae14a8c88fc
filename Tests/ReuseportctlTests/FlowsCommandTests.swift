#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// `flows`, `which` and `map dump` while a placement change runs: a pinned service grows 4 → 8,
/// its flows are recorded by the program, and the CLI reads the records from the pins.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "loading BPF programs needs root"))
struct FlowsCommandTests {
    @Test func recordsAreListedAndWhichSaysWhenOnePinsAFlow() throws {
        let root = PinRoot("flows-cli")
        let service = try PinnedService(root: root, name: "vpn", slots: 4, bucketCount: 4096)
        let plane = service.plane
        try plane.beginResize(to: 8, now: MonotonicClock.nanoseconds(), learnNs: 3_600_000_000_000)
        let target = plane.pending!.effective
        let destination = service.endpoint.address
        func bucket(_ client: FlowClient) -> Int {
            Int(FlowHash.bucket(hash: FlowHash.hash(FlowTuple(.udp, from: client.local, to: destination), seed: 0x5eed),
                                count: 4096))
        }
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let moving = clients.filter { target[bucket($0)] != plane.effectiveBuckets[bucket($0)] }
        let still = try #require(clients.first { target[bucket($0)] == plane.effectiveBuckets[bucket($0)] })
        let landed = try sendAndReceive(clients, to: service)
        let mover = try #require(moving.first)

        let learning = try reuseportctl(["which", "\(mover.local)", "--pin-dir", root.path])
        #expect(learning.status == 0, "\(learning)")
        #expect(learning.stdout.contains("record  slot \(landed[mover.local]!), idle"), "\(learning)")
        #expect(learning.stdout.contains("learned for the coming switch"), "\(learning)")

        try plane.advance(now: MonotonicClock.nanoseconds(), force: true)
        let pinned = try reuseportctl(["which", "\(mover.local)", "--json", "--pin-dir", root.path])
        let answer = try #require((try decodeJSON(pinned.stdout) as? [[String: Any]])?.first)
        #expect(answer["pinned"] as? Bool == true && answer["slot"] as? Int == Int(landed[mover.local]!),
                "the record decides: \(pinned)")
        #expect(answer["bucket_slot"] as? Int == Int(target[bucket(mover)]), "the bucket names its new slot")
        let unrecorded = try reuseportctl(["which", "\(still.local)", "--json", "--pin-dir", root.path])
        #expect((try decodeJSON(unrecorded.stdout) as? [[String: Any]])?.first?["record_slot"] is NSNull,
                "a flow of a bucket that did not move has no record")

        let listing = try reuseportctl(["flows", "--json", "--pin-dir", root.path])
        #expect(listing.status == 0, "\(listing)")
        let services = try #require(try decodeJSON(listing.stdout) as? [[String: Any]])
        let records = try #require(services.first?["records"] as? [[String: Any]])
        #expect(records.count == moving.count, "one record per flow of a moving bucket")
        #expect(Set(records.compactMap { $0["source"] as? String }) == Set(moving.map { "\($0.local)" }))
        for record in records {
            let source = try SocketAddress(parsing: try #require(record["source"] as? String))
            #expect(record["slot"] as? Int == Int(landed[source]!), "recorded with the slot it went to")
        }
        let slotOnly = try reuseportctl(["flows", "--slot", "\(landed[mover.local]!)", "--pin-dir", root.path])
        #expect(slotOnly.stdout.contains("\(mover.local)") && !slotOnly.stdout.contains("\(still.local) "), "\(slotOnly)")

        let dump = try #require(try decodeJSON(try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path]).stdout)
                                    as? [String: Any])
        let change = try #require(((dump["services"] as? [[String: Any]])?.first?["change"]) as? [String: Any])
        #expect(change["phase"] as? String == "draining" && change["records"] as? Int == moving.count
                    && change["recorded"] as? Int == moving.count, "\(change)")
        let text = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(text.stdout.contains("change     draining: "), "\(text)")
        let metrics = try reuseportctl(["stats", "--prometheus", "--pin-dir", root.path])
        #expect(metrics.stdout.contains("reuseport_flow_records{service=\"vpn\"} \(moving.count)"), "\(metrics)")
        #expect(metrics.stdout.contains("reuseport_placement_change_phase{service=\"vpn\"} 2"), "\(metrics)")
    }
}
