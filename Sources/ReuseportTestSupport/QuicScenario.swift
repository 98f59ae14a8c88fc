#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// QUIC connection-ID steering on a real kernel, written once: run by `@Test`s
/// (Tests/ReuseportKitTests/QuicSteeringTests.swift) and by kernel-check on every kernel of the
/// VM matrix. Real sockets, real datagrams; each scenario reads the program's counters back.
public enum QuicScenario {
    /// The layout the scenarios use: 12-octet CIDs, a one-octet host prefix, 2-octet worker IDs.
    public static let steering = try! QuicSteering(cidLength: 12, serverIDLength: 3, hostPrefix: [0x2a],
                                                   configRotation: 1)

    /// A UDP service of `slots` sockets on `address` (a loopback) with QUIC steering.
    public static func service(slots: Int, steering: QuicSteering? = QuicScenario.steering, seed: UInt32 = 0x5eed,
                               address: IPAddress = .loopbackV4) throws -> ServiceDataPlane
    {
        try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(address, 0))], slotCount: slots,
                             options: .init(seed: seed, receiveBuffer: 1 << 20, quic: steering))
    }

    public struct Migration: Sendable {
        /// For each slot, the slots its CID's datagrams reached (from `sources` source ports each).
        public var reached: [UInt32: Set<UInt32>]
        public var perSlotCounted: [UInt32: UInt64]
        public var counters: rp_quic_stats
    }

    /// For each slot, `sources` clients (distinct source ports: a client whose NAT rebinds) send
    /// one short-header datagram carrying a CID that names the slot. Every one must reach it.
    public static func shortHeadersFollowTheirCID(_ plane: ServiceDataPlane, sources: Int = 32) throws -> Migration {
        let destination = plane.listeners[0].endpoint.address
        let steering = plane.options.quic!
        var reached: [UInt32: Set<UInt32>] = [:]
        for slot in plane.slots {
            let clients = try Traffic.clients(sources, on: destination.address)
            for (index, client) in clients.enumerated() {
                let nonce = (0..<(steering.cidLength - 1 - steering.serverIDLength)).map { UInt8(truncatingIfNeeded: index * 7 + $0) }
                try client.send(QuicHeader.short(dcid: steering.connectionID(slot: slot, nonce: nonce)), to: destination)
            }
            let deliveries = try Traffic.receive(from: plane.listeners[0].sockets, expected: sources)
            try require(deliveries.count == sources, "\(deliveries.count) of \(sources) datagrams for slot \(slot) arrived")
            reached[slot] = Set(deliveries.map(\.slot))
        }
        var counted: [UInt32: UInt64] = [:]
        for slot in plane.slots { counted[slot] = try plane.maps.quicSlotCounters(slot).cid_steered }
        return Migration(reached: reached, perSlotCounted: counted, counters: try plane.maps.quicCounters())
    }

    public struct Handshake: Sendable {
        /// Per DCID: the slots its Initials reached, and the slot the Swift side predicts.
        public var reached: [[UInt8]: Set<UInt32>]
        public var predicted: [[UInt8]: UInt32]
        public var counters: rp_quic_stats
    }

    /// `dcids` client-chosen DCIDs (8 random octets, as clients choose them), each sent in an
    /// Initial from `sources` source ports: all Initials of one DCID must reach one slot, the one
    /// `SteeringSnapshot.quicPlacement` predicts.
    public static func initialsFollowTheirDCID(_ plane: ServiceDataPlane, dcids: Int = 32, sources: Int = 4) throws
        -> Handshake
    {
        let destination = plane.listeners[0].endpoint.address
        let snapshot = try plane.snapshot()
        var generator = SystemRandomNumberGenerator()
        var reached: [[UInt8]: Set<UInt32>] = [:]
        var predicted: [[UInt8]: UInt32] = [:]
        for _ in 0..<dcids {
            let dcid = (0..<8).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let packet = QuicHeader.initial(dcid: dcid)
            for client in try Traffic.clients(sources, on: destination.address) { try client.send(packet, to: destination) }
            let deliveries = try Traffic.receive(from: plane.listeners[0].sockets, expected: sources)
            try require(deliveries.count == sources, "\(deliveries.count) of \(sources) Initials arrived")
            reached[dcid] = Set(deliveries.map(\.slot))
            switch snapshot.quicPlacement(ofPayload: packet) {
            case .byDCIDHash(let placement): predicted[dcid] = placement.slot
            case .byConnectionID(let slot): predicted[dcid] = slot
            default: break
            }
        }
        return Handshake(reached: reached, predicted: predicted, counters: try plane.maps.quicCounters())
    }

    public struct Fallback: Sendable {
        /// Per client: the slot reached and the slot the flow hash predicts.
        public var landings: [(reached: UInt32, predicted: UInt32?)]
        public var counters: rp_quic_stats
    }

    /// The socket of `closed` leaves its array; short headers naming it (stale CIDs) and short
    /// headers of another config rotation (unknown CIDs) go by the flow hash, counted.
    public static func staleAndUnknownFallBack(_ plane: ServiceDataPlane, closed: UInt32, clients count: Int = 32)
        throws -> Fallback
    {
        let destination = plane.listeners[0].endpoint.address
        let steering = plane.options.quic!
        try plane.closeSlot(closed)
        defer { try? plane.reopenSlot(closed) }
        let snapshot = try plane.snapshot()
        let stale = QuicHeader.short(dcid: steering.connectionID(slot: closed))
        var unknownCID = steering.connectionID(slot: 0)
        unknownCID[0] = UInt8((steering.configRotation + 1) % 7) << 5
        let unknown = QuicHeader.short(dcid: unknownCID)
        let clients = try Traffic.clients(count, on: destination.address)
        for (index, client) in clients.enumerated() {
            try client.send(index % 2 == 0 ? stale : unknown, to: destination)
        }
        let deliveries = try Traffic.receive(from: plane.listeners[0].sockets, expected: count)
        try require(deliveries.count == count, "\(deliveries.count) of \(count) datagrams arrived")
        let landings = deliveries.map { delivery in
            (delivery.slot, snapshot.placement(of: FlowTuple(.udp, from: delivery.source, to: destination)).slot)
        }
        return Fallback(landings: landings, counters: try plane.maps.quicCounters())
    }

    /// Short headers whose CID names a slot past the end of the service's slot-indexed maps
    /// (sized from its workers: `ServiceDataPlane.slotCapacity`), up to the last slot a CID can
    /// name: bpf_sk_select_reuseport() finds no socket there (the array's lookup bounds the index
    /// by the map's own size, net/core/filter.c and kernel/bpf/reuseport_array.c), so they go by
    /// the flow hash, counted as fallbacks, with no select error and no per-slot counter beyond
    /// the map. Returns the landings and the counters.
    public static func beyondTheSlotMaps(_ plane: ServiceDataPlane, clients count: Int = 32) throws
        -> (fallback: Fallback, selectErrors: UInt64)
    {
        let destination = plane.listeners[0].endpoint.address
        let steering = plane.options.quic!
        let snapshot = try plane.snapshot()
        let beyond = [UInt32(plane.slotCapacity), UInt32(plane.slotCapacity) + 1, UInt32(RP_MAX_SLOTS) - 1]
        let clients = try Traffic.clients(count, on: destination.address)
        for (index, client) in clients.enumerated() {
            try client.send(QuicHeader.short(dcid: steering.connectionID(slot: beyond[index % beyond.count])),
                            to: destination)
        }
        let deliveries = try Traffic.receive(from: plane.listeners[0].sockets, expected: count)
        try require(deliveries.count == count, "\(deliveries.count) of \(count) datagrams arrived")
        let landings = deliveries.map { delivery in
            (delivery.slot, snapshot.placement(of: FlowTuple(.udp, from: delivery.source, to: destination)).slot)
        }
        return (Fallback(landings: landings, counters: try plane.maps.quicCounters()),
                try plane.maps.globalCounters().select_errors)
    }

    public struct Garbage: Sendable {
        public var sent: Int
        public var delivered: Int
        public var toForeign: Int
        /// Datagrams the program counted as dropped (QUIC unparsable or version negotiation,
        /// no slot, unparsable flow).
        public var countedDropped: UInt64
        public var counters: rp_quic_stats
        public var selectErrors: UInt64
        public var steeredByCID: UInt64
    }

    /// Datagrams of random content (first octet and DCID) and every length from 0 to 1500, each
    /// from one of `sources` source ports, with a foreign SO_REUSEPORT socket on the port.
    /// Each must be received on a slot of the service or counted as dropped; none reaches the
    /// foreign socket. Some carry a CID of the layout naming a random slot (maybe beyond the
    /// last), so that both the CID path and the fallback run.
    public static func garbageIn(_ plane: ServiceDataPlane, sources: Int = 64, shortHeadersOnly: Bool = false)
        throws -> Garbage
    {
        let destination = plane.listeners[0].endpoint.address
        let steering = plane.options.quic!
        let foreign = try ReuseportSocket(endpoint: plane.listeners[0].endpoint, receiveBuffer: 1 << 20)
        var all = plane.listeners[0].sockets
        all[SteeringScenario.ForeignSocket.foreignSlot] = foreign
        let clients = try Traffic.clients(sources, on: destination.address)
        var generator = SystemRandomNumberGenerator()
        var delivered = 0, toForeign = 0, sent = 0
        for start in stride(from: 0, through: 1500, by: 64) {
            for length in start..<min(start + 64, 1501) {
                var packet = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
                if length > steering.cidLength && length % 3 == 0 {
                    // A CID of the layout naming a slot up to twice the slot count.
                    let slot = UInt32.random(in: 0..<UInt32(2 * plane.slots.count), using: &generator)
                    packet.replaceSubrange(1...steering.cidLength, with: steering.connectionID(slot: slot))
                }
                if shortHeadersOnly, !packet.isEmpty { packet[0] &= 0x7f }
                try clients[length % sources].send(packet, to: destination)
                sent += 1
            }
            for delivery in try Traffic.receive(from: all, expected: Int.max, idleMs: 200) {
                if delivery.slot == SteeringScenario.ForeignSocket.foreignSlot { toForeign += 1 } else { delivered += 1 }
            }
        }
        let quic = try plane.maps.quicCounters()
        let global = try plane.maps.globalCounters()
        return Garbage(sent: sent, delivered: delivered, toForeign: toForeign,
                       countedDropped: quic.unparsable + quic.version_negotiation + global.dropped_no_slot
                           + global.unparsable,
                       counters: quic, selectErrors: global.select_errors, steeredByCID: quic.cid_steered)
    }
}
