#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The prediction (SteeringSnapshot) against rp_dispatch() in the branches a healthy service
/// rarely takes.
@Suite(.onTestThreads, .serialized)
struct PlacementMirrorTests {
    /// A bucket may name a slot at or beyond slot_count that has a socket: while a resize grows
    /// the slots, the buckets move before slot_count is written. The program selects that slot
    /// (it checks only the socket array), and the prediction read from the maps must too.
    @Test(.enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
    func aLiveSlotBeyondSlotCountIsSelectedAsTheProgramDoes() throws {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                         options: .init(bucketCount: 64, seed: 0x5eed))
        let destination = plane.listeners[0].endpoint.address
        let extra = try ReuseportSocket(endpoint: plane.listeners[0].endpoint)
        try plane.listeners[0].program.sockets.insert(extra, at: 5)
        var table = plane.buckets
        for bucket in stride(from: 0, to: table.count, by: 4) { table[bucket] = 5 }
        try plane.setBuckets(table)
        #expect(try plane.maps.readConfig().slot_count == 2)

        var sockets = plane.listeners[0].sockets
        sockets[5] = extra
        let clients = try Traffic.clients(200, on: .loopbackV4)
        let landed = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets)
        let snapshot = try plane.snapshot()
        for client in clients {
            let predicted = snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination))
            #expect(landed[client.local] == predicted.slot, "\(client.local): bucket slot \(predicted.bucketSlot)")
        }
        #expect(Set(landed.values) == [0, 1, 5], "flows of the buckets naming slot 5 land there")
    }

    /// rp_dispatch() drops every packet while bucket_count is 0 or above RP_MAX_BUCKETS; the
    /// prediction says the same, and does not divide by zero.
    @Test(arguments: [0, Int(RP_MAX_BUCKETS) + 1])
    func aBucketCountTheProgramRefusesPlacesNothing(buckets: Int) {
        let snapshot = SteeringSnapshot(seed: 1, slotCount: 2, buckets: [UInt32](repeating: 0, count: buckets),
                                        liveSlots: [0, 1])
        let flow = FlowTuple(.udp, from: SocketAddress(.loopbackV4, 40000), to: SocketAddress(.loopbackV4, 53))
        #expect(snapshot.placement(of: flow).slot == nil)
    }

    /// A socket that leaves the array behind the data plane's back (a worker's connect() does
    /// that on 6.18) is still named by the fallback table: the program tries the next entries
    /// (RP_FALLBACK_TRIES in all), and the prediction read from the maps follows it there,
    /// dropping only where every entry tried is empty.
    @Test(.enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
    func aSocketGoneBehindTheTablesBackIsSkippedAsTheProgramDoes() throws {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4,
                                         options: .init(bucketCount: 64, seed: 0x5eed))
        let destination = plane.listeners[0].endpoint.address
        try plane.closeSlot(1)
        #expect(try plane.maps.readConfig().live_count == 3)
        // Slot 2 leaves the array without the fallback table knowing.
        try plane.listeners[0].program.sockets.remove(at: 2)
        var sockets = plane.listeners[0].sockets
        sockets[2] = nil
        let snapshot = try plane.snapshot()
        #expect(snapshot.liveSlots == [0, 3] && snapshot.fallback.contains(2))

        let clients = try Traffic.clients(300, on: .loopbackV4)
        for client in clients { try client.send(Array("x".utf8), to: destination) }
        var landed: [SocketAddress: UInt32] = [:]
        for delivery in try Traffic.receive(from: sockets, expected: clients.count, idleMs: 300) {
            landed[delivery.source] = delivery.slot
        }
        var skipped = 0, dropped = 0, fellBack = 0
        for client in clients {
            let predicted = snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination))
            #expect(landed[client.local] == predicted.slot, "\(client.local): bucket slot \(predicted.bucketSlot)")
            let first = snapshot.fallback[Int(FlowHash.fallbackIndex(hash: predicted.hash))]
            if predicted.isFallback { fellBack += 1 }
            if predicted.isFallback && first == 2 { skipped += 1 }
            if predicted.slot == nil { dropped += 1 }
        }
        #expect(skipped > 0, "some flows met the stale entry first and went on to the next")
        let global = try plane.maps.globalCounters()
        #expect(global.fallbacks == UInt64(fellBack) && global.dropped_no_slot == UInt64(dropped))
    }
}
