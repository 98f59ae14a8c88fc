#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportTestSupport
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// QUIC connection-ID steering on the running kernel (QuicScenario): real sockets, real
/// datagrams, the program's counters read back from rp_quic_stats and rp_quic_slot_stats.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
struct QuicSteeringTests {
    static let families: [IPAddress] = [.loopbackV4, .loopbackV6]

    /// A client whose source port changes (NAT rebinding) keeps reaching the slot its CID names.
    @Test(arguments: families)
    func shortHeadersReachTheSlotTheirCIDNames(address: IPAddress) throws {
        let plane = try QuicScenario.service(slots: 4, address: address)
        let outcome = try QuicScenario.shortHeadersFollowTheirCID(plane, sources: 32)
        for slot in plane.slots {
            #expect(outcome.reached[slot] == [slot], "slot \(slot)'s CID reached \(outcome.reached[slot] ?? [])")
            #expect(outcome.perSlotCounted[slot] == 32)
        }
        #expect(outcome.counters.cid_steered == 4 * 32)
        #expect(outcome.counters.unknown_cid == 0 && outcome.counters.fallbacks == 0)
    }

    /// Initials go by their DCID, not the 4-tuple: one DCID from many ports reaches one slot,
    /// the one the Swift side predicts; and different DCIDs spread.
    @Test(arguments: families)
    func initialsFollowTheirDCID(address: IPAddress) throws {
        let plane = try QuicScenario.service(slots: 4, address: address)
        let outcome = try QuicScenario.initialsFollowTheirDCID(plane, dcids: 64, sources: 4)
        for (dcid, slots) in outcome.reached {
            #expect(slots.count == 1 && slots.first == outcome.predicted[dcid], "\(QuicSteering.hex(dcid)): \(slots)")
        }
        #expect(Set(outcome.reached.values.compactMap(\.first)).count == 4, "64 DCIDs spread over every slot")
        #expect(outcome.counters.initials == 64 * 4)
        #expect(outcome.counters.dcid_hashed + outcome.counters.cid_steered == 64 * 4)
    }

    /// A CID naming a slot without a socket, or of another config rotation, goes by the flow
    /// hash (to the predicted slot) and is counted.
    @Test(arguments: families)
    func staleAndUnknownCIDsFallBackToFlowSteering(address: IPAddress) throws {
        let plane = try QuicScenario.service(slots: 4, address: address)
        let outcome = try QuicScenario.staleAndUnknownFallBack(plane, closed: 2, clients: 32)
        for landing in outcome.landings { #expect(landing.reached == landing.predicted) }
        #expect(!outcome.landings.contains { $0.reached == 2 })
        #expect(outcome.counters.fallbacks == 16)
        #expect(outcome.counters.unknown_cid == 16)
        #expect(outcome.counters.cid_steered == 0)
    }

    /// The slot-indexed maps of 4 workers hold 16 slots: a CID naming slot 16, 17 or 1023 goes by
    /// the flow hash (to the predicted slot), counted as a fallback, with no select error.
    @Test(arguments: families)
    func cidsNamingSlotsPastTheMapsFallBackToFlowSteering(address: IPAddress) throws {
        let plane = try QuicScenario.service(slots: 4, address: address)
        let (outcome, selectErrors) = try QuicScenario.beyondTheSlotMaps(plane, clients: 32)
        #expect(plane.slotCapacity == 16)
        for landing in outcome.landings { #expect(landing.reached == landing.predicted) }
        #expect(outcome.counters.fallbacks == 32 && outcome.counters.cid_steered == 0)
        #expect(selectErrors == 0)
    }

    /// Random datagrams of 0 to 1500 octets from many sources: every one is received on a slot
    /// of the service or counted as dropped; none reaches a foreign socket on the port.
    @Test(arguments: [true, false])
    func garbageIsSteeredOrCountedNeverForeign(shortHeadersOnly: Bool) throws {
        let plane = try QuicScenario.service(slots: 4)
        let outcome = try QuicScenario.garbageIn(plane, sources: 64, shortHeadersOnly: shortHeadersOnly)
        print("garbage in (short headers only: \(shortHeadersOnly)): \(outcome.sent) sent, \(outcome.delivered) "
              + "delivered, \(outcome.countedDropped) counted dropped, \(outcome.steeredByCID) by CID")
        #expect(outcome.toForeign == 0)
        #expect(UInt64(outcome.delivered) + outcome.countedDropped == UInt64(outcome.sent))
        #expect(outcome.selectErrors == 0)
        #expect(outcome.steeredByCID > 0, "the CID path ran")
        #expect(outcome.counters.unparsable >= 16, "payloads of 0 to 15 octets are unparsable")
    }

    /// Version negotiation (a long header of version 0) is counted and dropped.
    @Test func versionNegotiationIsCountedAndDropped() throws {
        let plane = try QuicScenario.service(slots: 2)
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        var packet = QuicHeader.initial(dcid: [1, 2, 3, 4, 5, 6, 7, 8])
        packet.replaceSubrange(1...4, with: [0, 0, 0, 0])
        try client.send(packet, to: plane.listeners[0].endpoint.address)
        #expect(try Traffic.receive(from: plane.listeners[0].sockets, expected: 1, idleMs: 300).isEmpty)
        #expect(try plane.maps.quicCounters().version_negotiation == 1)
    }

    /// Without QUIC steering, the same CID from many ports spreads by flow: what the feature fixes.
    @Test func withoutQuicSteeringACIDDoesNotKeepItsSlot() throws {
        let plane = try QuicScenario.service(slots: 4, steering: nil)
        let destination = plane.listeners[0].endpoint.address
        let packet = QuicHeader.short(dcid: QuicScenario.steering.connectionID(slot: 1))
        let clients = try Traffic.clients(32, on: .loopbackV4)
        for client in clients { try client.send(packet, to: destination) }
        let reached = Set(try Traffic.receive(from: plane.listeners[0].sockets, expected: 32).map(\.slot))
        #expect(reached.count > 1)
        #expect(try plane.maps.quicCounters().cid_steered == 0)
        #expect(try plane.maps.readQuicSteering() == nil)
    }
}

/// The layout's rules and the one parser (bpf/dispatch.h), called from Swift: no kernel needed.
@Suite(.onTestThreads) struct QuicLayoutTests {
    @Test func serverIDCarriesPrefixAndSlot() throws {
        let steering = try QuicSteering(cidLength: 12, serverIDLength: 4, hostPrefix: [0xab, 0xcd], configRotation: 2)
        #expect(steering.serverID(slot: 0x123) == [0xab, 0xcd, 0x01, 0x23])
        let cid = steering.connectionID(slot: 0x123, nonce: [9, 9, 9, 9, 9, 9, 9])
        #expect(cid.count == 12 && cid[0] >> 5 == 2)
        #expect(steering.slot(ofCID: cid) == 0x123)
        var otherHost = cid
        otherHost[1] = 0xac
        #expect(steering.slot(ofCID: otherHost) == nil)
        var otherRotation = cid
        otherRotation[0] = 3 << 5
        #expect(steering.slot(ofCID: otherRotation) == nil)
        // The bits above the slot are the generation's: not a CID of this configuration today.
        var generation = cid
        generation[3] = 0x04
        #expect(steering.slot(ofCID: generation) == nil)
        #expect(QuicSteering(steering.config) == steering)
    }

    @Test func impossibleLayoutsNameTheSetting() {
        #expect(throws: QuicSteering.Problem.self) { try QuicSteering(cidLength: 7) }
        #expect(throws: QuicSteering.Problem.self) { try QuicSteering(cidLength: 21) }
        // 8 octets: 1 + 3 of server ID + 4 of nonce at most.
        #expect(throws: QuicSteering.Problem.self) { try QuicSteering(cidLength: 8, serverIDLength: 4) }
        #expect(throws: QuicSteering.Problem.self) { try QuicSteering(cidLength: 12, hostPrefix: [1, 2, 3, 4]) }
        #expect(throws: QuicSteering.Problem.self) { try QuicSteering(cidLength: 12, configRotation: 7) }
        do {
            _ = try QuicSteering(cidLength: 8, serverIDLength: 4)
        } catch {
            #expect(error.setting == .serverIDLength)
        }
    }

    @Test func headersAreClassifiedAsTheProgramDoes() throws {
        let steering = QuicScenario.steering
        #expect(QuicHeader(payload: [], steering: steering).kind == .unparsable)
        #expect(QuicHeader(payload: [0x40] + [UInt8](repeating: 1, count: 11), steering: steering).kind == .unparsable,
                "a short header must hold its 12-octet DCID")
        let short = QuicHeader(payload: QuicHeader.short(dcid: steering.connectionID(slot: 3)), steering: steering)
        #expect(short.kind == .short && short.dcid == steering.connectionID(slot: 3))
        let initial = QuicHeader(payload: QuicHeader.initial(dcid: [1, 2, 3, 4, 5, 6, 7, 8]), steering: steering)
        #expect(initial.kind == .long && initial.isInitial && initial.dcid == [1, 2, 3, 4, 5, 6, 7, 8])
        var tooLong = QuicHeader.initial(dcid: [UInt8](repeating: 0, count: 20))
        tooLong[5] = 21
        #expect(QuicHeader(payload: tooLong, steering: steering).kind == .unparsable)
        let versionNegotiation: [UInt8] = [0xc0, 0, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 1]
        #expect(QuicHeader(payload: versionNegotiation, steering: steering).kind == .versionNegotiation)
        #expect(QuicHeader(payload: Array(versionNegotiation.prefix(15)), steering: steering).kind == .unparsable,
                "under 16 octets nothing is parsed")
        #expect(QuicHeader.dcidHash([1, 2, 3, 4, 5, 6, 7, 8], seed: 1)
                != QuicHeader.dcidHash([1, 2, 3, 4, 5, 6, 7, 8, 0], seed: 1), "the length counts")
        var sevenOctets = QuicHeader.initial(dcid: [1, 2, 3, 4, 5, 6, 7])
        #expect(QuicHeader(payload: sevenOctets, steering: steering).kind == .unparsable,
                "no client chooses a first DCID under 8 octets")
        sevenOctets[5] = 8
        #expect(QuicHeader(payload: sevenOctets, steering: steering).kind == .long)
    }

    @Test func hexRoundTrips() {
        #expect(QuicSteering.octets(hex: "0x2a:00-1f") == [0x2a, 0x00, 0x1f])
        #expect(QuicSteering.octets(hex: "abc") == nil)
        #expect(QuicSteering.hex([0x2a, 0x00, 0x1f]) == "2a001f")
    }
}
