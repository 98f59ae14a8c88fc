#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport

/// Where flows land: exactly on the predicted slot, the same slot after a socket is
/// replaced, never on a foreign socket; and, for contrast, how the kernel's own hash
/// moves flows.
enum SteeringChecks {
    /// How clients reach the service.
    enum Family: String, CaseIterable {
        /// IPv4 clients, IPv4 listener.
        case v4 = "4"
        /// IPv6 clients, IPv6 listener.
        case v6 = "6"
        /// IPv4 clients, dual-stack IPv6 listener on [::] (IPV6_V6ONLY off): the kernel
        /// hands the program an IPv4 packet.
        case mapped = "-mapped"

        var listen: IPAddress { self == .v4 ? .loopbackV4 : self == .v6 ? .loopbackV6 : IPAddress("::")! }
        var client: IPAddress { self == .v6 ? .loopbackV6 : .loopbackV4 }
    }

    /// 4 sockets and 16: above 10 the kernel's UDP lookup takes the second hash table
    /// (hslot2 in net/ipv4/udp.c), a different path into reuseport selection.
    static let groupSizes = [4, 16]
    static let udpFlows = 512
    static let tcpFlows = 256

    static let all: [Check] =
        Transport.allCases.flatMap { transport in
            Family.allCases.flatMap { family in groupSizes.map { exactSlot(transport, family, slots: $0) } }
        } + [Family.v4, .v6].map(fallbackTable) + [Family.v4, .v6].map(flowRecords)
            + [Family.v4, .v6].map(generationSwitch) + [tcpMigration]
        + [closedSocketLeavesArray, replacingKeepsFlows, kernelDefaultMovesFlows, foreignSocketGetsNothing]

    static func service(_ transport: Transport, _ family: Family, slots: Int) throws -> ServiceDataPlane {
        try Fixture.service(transport, on: family.listen, slots: slots, v6Only: family != .mapped)
    }

    /// Emptied slots' flows go where `which` predicts through the fallback table, are counted,
    /// and come back when the slots are refilled (FallbackScenario).
    static func fallbackTable(_ family: Family) -> Check {
        Check("fallback-udp\(family.rawValue)",
              "flows of 2 emptied slots of 8 fall back to the predicted live slot, counted; refilling restores them") { _ in
            let plane = try service(.udp, family, slots: 8)
            return try FallbackScenario.run(plane, clients: try Traffic.clients(256, on: family.client), emptied: [2, 5],
                                            destination: destination(of: plane, family))
        }
    }

    /// A change records the flows of the moving buckets and keeps them through the switch
    /// (TransitionScenario): a hash map without preallocation, updated by the SK_REUSEPORT program.
    static func flowRecords(_ family: Family) -> Check {
        liveAndNewFlows("flow-records-udp\(family.rawValue)",
                        "a scale 4 → 6 records the moving buckets' flows; each keeps its slot through the switch",
                        family, TransitionScenario.run)
    }

    /// A new generation takes no flow while it starts, and at its switch every live flow keeps
    /// its old slot while new flows go to the new one (GenerationScenario): the same program
    /// and maps, a placement change of every bucket.
    static func generationSwitch(_ family: Family) -> Check {
        liveAndNewFlows("generation-switch-udp\(family.rawValue)",
                        "a generation of 4 slots beside 4 takes no flow until it switches; then live flows stay, new ones go to it",
                        family, GenerationScenario.run)
    }

    /// A scenario of a 4-slot UDP service with 256 live flows and 256 new ones.
    static func liveAndNewFlows(
        _ name: String, _ summary: String, _ family: Family,
        _ scenario: @escaping @Sendable (ServiceDataPlane, [FlowClient], [FlowClient], SocketAddress?) throws -> String
    ) -> Check {
        Check(name, summary) { _ in
            let plane = try service(.udp, family, slots: 4)
            return try scenario(plane, try Traffic.clients(256, on: family.client),
                                try Traffic.clients(256, on: family.client), destination(of: plane, family))
        }
    }

    /// A closing TCP listener's queued connections move to a live slot (5.14+), or the check says
    /// that this kernel resets them (MigrationScenario).
    static let tcpMigration = Check("tcp-migrate",
                                    "connections queued at a closing listener are accepted from a live slot (5.14+)") { _ in
        try MigrationScenario.run(try service(.tcp, .v4, slots: 2), clients: try Traffic.clients(32, .tcp, on: .loopbackV4))
    }

    /// The address clients send to (for [::], the IPv4 loopback on the same port).
    static func destination(of plane: ServiceDataPlane, _ family: Family) -> SocketAddress {
        let bound = plane.listeners[0].endpoint.address
        return family == .mapped ? SocketAddress(.loopbackV4, bound.port) : bound
    }

    static func exactSlot(_ transport: Transport, _ family: Family, slots: Int) -> Check {
        let flows = transport == .udp ? udpFlows : tcpFlows
        return Check(
            "exact-\(transport)\(family.rawValue)-\(slots)",
            "\(flows) \(transport) flows (\(family == .mapped ? "IPv4 to a dual-stack socket" : "IPv\(family.rawValue)")) "
                + "over \(slots) sockets each land on the predicted slot",
            breakable: true
        ) { context in
            let plane = try service(transport, family, slots: slots)
            let destination = destination(of: plane, family)
            let outcome = try SteeringScenario.exactSlot(plane, transport, clients: family.client, to: destination,
                                                         flows: flows)
            var onSlot = 0
            var firstMiss: String?
            for landing in outcome.landings {
                let predicted = landing.predicted!
                // --break: expect the neighbouring slot, which no flow can satisfy.
                let expected = context.broken ? (predicted + 1) % UInt32(slots) : predicted
                if landing.slot == expected && landing.peer == landing.client {
                    onSlot += 1
                } else if firstMiss == nil {
                    firstMiss = "\(landing.client) expected slot \(expected), got \(landing.slot.map(String.init) ?? "nothing")"
                }
            }
            let used = outcome.slotsUsed
            let counted = outcome.counted
            context.record("on_expected_slot", "\(onSlot)/\(flows)")
            try context.expect(onSlot == flows, "\(onSlot)/\(flows) flows on the expected slot; first miss: \(firstMiss!)"
                               + (context.broken ? " (deliberately broken: expected slot shifted by one)" : ""))
            try context.expect(used == slots, "only \(used) of \(slots) slots received flows")
            try context.expect(counted == UInt64(flows), "the program counted \(counted) of \(flows): not the BPF path")
            return "\(onSlot)/\(flows) on the predicted slot, \(used)/\(slots) slots used, program counted \(counted)"
        }
    }

    static let closedSocketLeavesArray = Check(
        "closed-socket-leaves-array",
        "a socket closed while in the array leaves it (lookup ENOENT); an open one stays (its cookie)"
    ) { context in
        let plane = try service(.udp, .v4, slots: 4)
        let array = plane.listeners[0].program.sockets
        let kept = plane.listeners[0].sockets[2]!
        // Closed behind the array's back: no map delete, only close(2).
        plane.listeners[0].sockets[1]!.close()
        try context.expectErrno(SocketArrayChecks.lookup(array, slot: 1).result, ENOENT, key: "closed_slot_lookup")
        let cookie = try array.cookie(at: 2)
        try context.expect(cookie == (try kept.cookie()), "the open socket's slot holds \(cookie.map(String.init) ?? "nothing")")
        return "closed socket's slot gives ENOENT, open socket's slot keeps its cookie"
    }

    static let replacingKeepsFlows = Check(
        "replace-same-slot",
        "closing a slot's socket and putting a new one at the same slot keeps every flow on its slot"
    ) { context in
        let plane = try service(.udp, .v4, slots: 4)
        let outcome = try SteeringScenario.replaceAtSlot(plane, slot: 1, flows: udpFlows)
        let (moved, onReplaced) = (outcome.moved, outcome.onReplaced)
        context.record("moved", "\(moved)/\(udpFlows)")
        try context.expect(onReplaced > 0, "no flow was on the replaced slot: the check proves nothing")
        try context.expect(moved == 0, "\(moved) of \(udpFlows) flows changed slot")
        return "0/\(udpFlows) flows moved (\(onReplaced) were on the replaced slot)"
    }

    /// Why the product exists. Without a program the kernel hashes onto socket positions,
    /// and a closing socket's place is taken by the group's last one
    /// (net/core/sock_reuseport.c, __reuseport_detach_sock()).
    static let kernelDefaultMovesFlows = Check(
        "kernel-default-moves",
        "without the program, replacing one of 4 sockets moves flows (fraction recorded)"
    ) { context in
        let moved = try SteeringScenario.kernelDefaultReplace(sockets: 4, replacing: 1, flows: udpFlows,
                                                              receiveBuffer: Fixture.receiveBuffer).moved
        context.record("moved", "\(moved)/\(udpFlows)")
        context.record("fraction", percent(moved, of: udpFlows))
        try context.expect(moved > 0, "the kernel's own reuseport moved no flow")
        return "\(moved)/\(udpFlows) flows moved (\(percent(moved, of: udpFlows)))"
    }

    static let foreignSocketGetsNothing = Check(
        "foreign-socket-ignored",
        "a foreign SO_REUSEPORT socket on the port receives none of 1000 datagrams"
    ) { context in
        let plane = try service(.udp, .v4, slots: 4)
        let outcome = try SteeringScenario.foreignSocket(plane, clients: 250, rounds: 4,
                                                         receiveBuffer: Fixture.receiveBuffer)
        let (deliveries, toForeign, counted) = (outcome.deliveries, outcome.toForeign, outcome.counted)
        context.record("foreign_received", toForeign)
        try context.expect(deliveries.count == 1000, "\(deliveries.count) of 1000 datagrams arrived")
        try context.expect(toForeign == 0, "the foreign socket received \(toForeign)")
        try context.expect(counted == 1000, "the program counted \(counted) of 1000")
        return "foreign socket got 0 of 1000, program steered all 1000"
    }
}
