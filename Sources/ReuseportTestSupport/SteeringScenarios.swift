import ReuseportKit

/// The kernel-behaviour scenarios of steering, written once: each is run by a `@Test`
/// (Tests/ReuseportKitTests/SteeringTests.swift) and by a kernel-check check
/// (Sources/kernel-check/SteeringChecks.swift), which assert on what it measured.
public enum SteeringScenario {
    /// One flow: where the client sent from, what the kernel reported as its peer, the slot
    /// that received it and the slot the Swift side predicts.
    public struct Landing: Sendable {
        public var client: SocketAddress
        public var peer: SocketAddress?
        public var slot: UInt32?
        public var predicted: UInt32?
    }

    public struct ExactSlot: Sendable {
        public var landings: [Landing]
        /// Datagrams or connections the program counted over every slot.
        public var counted: UInt64
        /// How many slots received at least one flow.
        public var slotsUsed: Int { Set(landings.compactMap(\.slot)).count }
    }

    /// `flows` UDP flows (one datagram each) or TCP connections from clients on `clients`
    /// to `destination`, each received on one of `plane`'s first listener's sockets.
    /// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d: peers are given unmapped.
    public static func exactSlot(_ plane: ServiceDataPlane, _ transport: Transport, clients address: IPAddress,
                                 to destination: SocketAddress, flows: Int) throws -> ExactSlot {
        let sockets = plane.listeners[0].sockets
        let snapshot = try plane.snapshot()
        func predicted(_ client: FlowClient) -> UInt32? {
            snapshot.placement(of: FlowTuple(transport, from: client.local, to: destination)).slot
        }
        var landings: [Landing] = []
        if transport == .udp {
            let clients = try Traffic.clients(flows, on: address)
            var landed: [SocketAddress: UInt32] = [:]
            for (source, slot) in try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets) {
                landed[unmapped(source)] = slot
            }
            landings = clients.map {
                Landing(client: $0.local, peer: landed[$0.local] == nil ? nil : $0.local, slot: landed[$0.local],
                        predicted: predicted($0))
            }
        } else {
            for _ in 0..<flows {
                let client = try FlowClient(.tcp, local: SocketAddress(address, 0))
                try client.connect(to: destination)
                guard let accepted = try Traffic.acceptOne(from: sockets) else {
                    throw TrafficError.timeout("connection from \(client.local) was not accepted")
                }
                landings.append(Landing(client: client.local, peer: unmapped(accepted.peer), slot: accepted.slot,
                                        predicted: predicted(client)))
            }
        }
        return ExactSlot(landings: landings, counted: try packets(plane))
    }

    public struct Replacement: Sendable {
        /// Each flow's slot before and after the replacement.
        public var before: [SocketAddress: UInt32]
        public var after: [SocketAddress: UInt32]
        /// Flows whose slot changed.
        public var moved: Int
        /// Flows that were on the replaced slot before.
        public var onReplaced: Int
    }

    /// `flows` UDP flows; then the socket at `slot` is closed and a new one put at the same
    /// slot; the same flows again.
    public static func replaceAtSlot(_ plane: ServiceDataPlane, slot: UInt32 = 1, flows: Int) throws -> Replacement {
        let destination = plane.listeners[0].endpoint.address
        let clients = try Traffic.clients(flows, on: destination.address)
        let before = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        try plane.closeSlot(slot)
        try plane.reopenSlot(slot)
        let after = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        return Replacement(before: before, after: after,
                           moved: clients.filter { before[$0.local] != after[$0.local] }.count,
                           onReplaced: before.values.filter { $0 == slot }.count)
    }

    /// The same as `replaceAtSlot` without the program: a plain SO_REUSEPORT group of
    /// `sockets` UDP sockets on 127.0.0.1, one replaced by a new socket. The kernel moves its
    /// last socket into the hole (net/core/sock_reuseport.c, __reuseport_detach_sock()) and
    /// hashes on socket positions, so flows move.
    public static func kernelDefaultReplace(sockets count: Int = 4, replacing slot: UInt32 = 1, flows: Int,
                                            receiveBuffer: Int? = nil) throws -> Replacement {
        let first = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(.loopbackV4, 0)),
                                        receiveBuffer: receiveBuffer)
        var group: [UInt32: ReuseportSocket] = [0: first]
        for index in 1..<UInt32(count) {
            group[index] = try ReuseportSocket(endpoint: first.endpoint, receiveBuffer: receiveBuffer)
        }
        let clients = try Traffic.clients(flows, on: .loopbackV4)
        let before = try Traffic.slotsOf(clients: clients, sending: first.endpoint.address, sockets: group)
        group[slot]!.close()
        group[slot] = try ReuseportSocket(endpoint: first.endpoint, receiveBuffer: receiveBuffer)
        let after = try Traffic.slotsOf(clients: clients, sending: first.endpoint.address, sockets: group)
        return Replacement(before: before, after: after,
                           moved: clients.filter { before[$0.local] != after[$0.local] }.count,
                           onReplaced: before.values.filter { $0 == slot }.count)
    }

    public struct ForeignSocket: Sendable {
        /// Every datagram received, on the service's slots or (slot `foreignSlot`) the foreign socket.
        public var deliveries: [Delivery]
        public var toForeign: Int { deliveries.filter { $0.slot == ForeignSocket.foreignSlot }.count }
        /// Datagrams the program counted over every slot.
        public var counted: UInt64
        public static let foreignSlot: UInt32 = 99
    }

    /// A foreign SO_REUSEPORT socket of the same user joins the port of `plane`'s first
    /// listener; `clients` clients send `rounds` datagrams each.
    public static func foreignSocket(_ plane: ServiceDataPlane, clients count: Int = 250, rounds: Int = 4,
                                     receiveBuffer: Int? = nil) throws -> ForeignSocket {
        let destination = plane.listeners[0].endpoint.address
        let foreign = try ReuseportSocket(endpoint: plane.listeners[0].endpoint, receiveBuffer: receiveBuffer)
        var all = plane.listeners[0].sockets
        all[ForeignSocket.foreignSlot] = foreign
        let clients = try Traffic.clients(count, on: destination.address)
        var deliveries: [Delivery] = []
        // Read after each round: all datagrams at once could overflow default receive buffers.
        for round in 0..<rounds {
            for client in clients { try client.send(Array("r\(round)".utf8), to: destination) }
            deliveries += try Traffic.receive(from: all, expected: count)
        }
        return ForeignSocket(deliveries: deliveries, counted: try packets(plane))
    }

    /// Packets the program counted over every slot of `plane`.
    static func packets(_ plane: ServiceDataPlane) throws -> UInt64 {
        try plane.slots.map { try plane.maps.slotCounters($0).packets }.reduce(0, +)
    }

    static func unmapped(_ address: SocketAddress) -> SocketAddress {
        SocketAddress(address.address.unmapped, address.port)
    }
}
