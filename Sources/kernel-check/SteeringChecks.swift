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
        } + [Family.v4, .v6].map(fallbackTable)
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

    /// The address clients send to (for [::], the IPv4 loopback on the same port).
    static func destination(of plane: ServiceDataPlane, _ family: Family) -> SocketAddress {
        let bound = plane.listeners[0].endpoint.address
        return family == .mapped ? SocketAddress(.loopbackV4, bound.port) : bound
    }

    /// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    static func unmapped(_ address: SocketAddress) -> SocketAddress {
        SocketAddress(address.address.unmapped, address.port)
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
            let sockets = plane.listeners[0].sockets
            let snapshot = try plane.snapshot()
            var landed: [SocketAddress: UInt32] = [:]
            var clients: [FlowClient] = []
            if transport == .udp {
                clients = try Traffic.clients(flows, on: family.client)
                for (index, client) in clients.enumerated() {
                    try client.send(Array("flow \(index)".utf8), to: destination)
                }
                for delivery in try Traffic.receive(from: sockets, expected: flows) {
                    landed[unmapped(delivery.source)] = delivery.slot
                }
            } else {
                for _ in 0..<flows {
                    let client = try FlowClient(.tcp, local: SocketAddress(family.client, 0))
                    try client.connect(to: destination)
                    guard let accepted = try Traffic.acceptOne(from: sockets) else {
                        throw CheckFailure(description: "connection from \(client.local) was not accepted")
                    }
                    landed[unmapped(accepted.peer)] = accepted.slot
                    clients.append(client)
                }
            }
            var onSlot = 0
            var firstMiss: String?
            for client in clients {
                let predicted = snapshot.placement(of: FlowTuple(transport, from: client.local, to: destination)).slot!
                // --break: expect the neighbouring slot, which no flow can satisfy.
                let expected = context.broken ? (predicted + 1) % UInt32(slots) : predicted
                if landed[client.local] == expected {
                    onSlot += 1
                } else if firstMiss == nil {
                    firstMiss = "\(client.local) expected slot \(expected), got \(landed[client.local].map(String.init) ?? "nothing")"
                }
            }
            let used = Set(landed.values).count
            let counted = try (0..<UInt32(slots)).map { try plane.maps.slotCounters($0).packets }.reduce(0, +)
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
        let destination = plane.listeners[0].endpoint.address
        let clients = try Traffic.clients(udpFlows, on: .loopbackV4)
        let before = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        try plane.closeSlot(1)
        try plane.reopenSlot(1)
        let after = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        let moved = clients.filter { before[$0.local] != after[$0.local] }.count
        let onReplaced = before.values.filter { $0 == 1 }.count
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
        let first = try Fixture.socket(Endpoint(.udp, SocketAddress(.loopbackV4, 0)))
        var group: [UInt32: ReuseportSocket] = [0: first]
        for slot in 1..<UInt32(4) { group[slot] = try Fixture.socket(first.endpoint) }
        let clients = try Traffic.clients(udpFlows, on: .loopbackV4)
        let before = try Traffic.slotsOf(clients: clients, sending: first.endpoint.address, sockets: group)
        group[1]!.close()
        group[1] = try Fixture.socket(first.endpoint)
        let after = try Traffic.slotsOf(clients: clients, sending: first.endpoint.address, sockets: group)
        let moved = clients.filter { before[$0.local] != after[$0.local] }.count
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
        let destination = plane.listeners[0].endpoint.address
        let foreign = try Fixture.socket(plane.listeners[0].endpoint)
        var all = plane.listeners[0].sockets
        all[99] = foreign
        let clients = try Traffic.clients(250, on: .loopbackV4)
        var deliveries: [Delivery] = []
        // Read after each round: 1000 datagrams at once could overflow default receive buffers.
        for round in 0..<4 {
            for client in clients { try client.send(Array("r\(round)".utf8), to: destination) }
            deliveries += try Traffic.receive(from: all, expected: 250)
        }
        let toForeign = deliveries.filter { $0.slot == 99 }.count
        let counted = try (0..<UInt32(4)).map { try plane.maps.slotCounters($0).packets }.reduce(0, +)
        context.record("foreign_received", toForeign)
        try context.expect(deliveries.count == 1000, "\(deliveries.count) of 1000 datagrams arrived")
        try context.expect(toForeign == 0, "the foreign socket received \(toForeign)")
        try context.expect(counted == 1000, "the program counted \(counted) of 1000")
        return "foreign socket got 0 of 1000, program steered all 1000"
    }
}
