#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import ReuseportKit
import ReuseportTestSupport

/// The rules of REUSEPORT_SOCKARRAY (net/core/reuseport_array.c) the kit relies on, and
/// what a connected UDP socket does to the group.
enum SocketArrayChecks {
    static let all: [Check] = [unboundIsRefused, sameSocketTwiceIsBusy, lookupReturnsCookie, connectedUDP, leavingPort]

    /// Writes `fd` at `slot` straight through libbpf; returns 0 or the errno.
    static func update(_ array: SocketArray, slot: UInt32, fd: Int32) -> Int32 {
        var key = slot
        var value = UInt64(fd)
        return array.map.withDescriptor { bpf_map_update_elem($0, &key, &value, UInt64(BPF_ANY)) } == 0 ? 0 : errno
    }

    /// Looks `slot` up straight through libbpf; returns 0 or the errno, and the cookie.
    static func lookup(_ array: SocketArray, slot: UInt32) -> (result: Int32, cookie: UInt64) {
        var key = slot
        var value: UInt64 = 0
        return (array.map.withDescriptor { bpf_map_lookup_elem($0, &key, &value) } == 0 ? 0 : errno, value)
    }

    static func service(slots: Int) throws -> ServiceDataPlane {
        try Fixture.service(.udp, on: .loopbackV4, slots: slots)
    }

    /// What the daemon does before the last close of a UDP socket leaving a serving group
    /// (ReuseportSocket.leavePort: SO_BINDTOIFINDEX to an index no device has, 5.0): while a
    /// flood goes to slot 0, sockets join the group and leave it, and not one datagram is lost.
    /// `--break` closes them without leaving the port first, which loses some (the kernel's close
    /// race; a kernel that loses none there fails the broken run, which is then no proof).
    static let leavingPort = Check(
        "leave-port", "a UDP socket that leaves its port first (SO_BINDTOIFINDEX) takes no datagram of its group with it",
        breakable: true
    ) { context in
        // The mechanism, deterministic on any number of CPUs: a socket that left gets nothing.
        let (stayed, left) = try LeavingSocketScenario.leftSocketGetsNothing()
        context.record("flows_to_left_socket", left)
        try context.expect(stayed == 64 && left == 0, "of 64 flows, \(stayed) reached the staying socket and \(left) the one that left its port")
        // The race it closes, where two CPUs let the close and the flood overlap.
        let outcome = try LeavingSocketScenario.run(leavings: context.broken ? 3000 : 60, leavingPort: !context.broken)
        context.record("sent", outcome.sent)
        context.record("leavings", outcome.leavings)
        context.record("lost", outcome.lost)
        try context.expect(outcome.drops == 0, "\(outcome)")
        try context.expect(outcome.lost == 0, "\(outcome)")
        return "\(outcome.sent) datagrams, \(outcome.leavings) sockets left the group, \(outcome.readOff) read off them, 0 lost"
    }

    static let unboundIsRefused = Check(
        "array-unbound-einval", "inserting an unbound UDP socket into the array fails with EINVAL"
    ) { context in
        let plane = try service(slots: 2)
        let unbound = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "udp")
        let refused = unbound.withFD { update(plane.listeners[0].program.sockets, slot: 5, fd: $0) }
        return try context.expectErrno(refused, EINVAL)
    }

    static let sameSocketTwiceIsBusy = Check(
        "array-same-socket-ebusy", "inserting a socket already in the array at a second slot fails with EBUSY"
    ) { context in
        let plane = try service(slots: 2)
        let socket = plane.listeners[0].sockets[0]!
        return try context.expectErrno(update(plane.listeners[0].program.sockets, slot: 3, fd: socket.fd.rawValue), EBUSY)
    }

    static let lookupReturnsCookie = Check(
        "array-lookup-cookie", "a lookup returns the socket's SO_COOKIE; an empty slot gives ENOENT"
    ) { context in
        let plane = try service(slots: 2)
        let array = plane.listeners[0].program.sockets
        for slot in 0..<UInt32(2) {
            let cookie = try plane.listeners[0].sockets[slot]!.cookie()
            let found = try array.cookie(at: slot)
            try context.expect(found == cookie, "slot \(slot): lookup gave \(found.map(String.init) ?? "ENOENT"), SO_COOKIE is \(cookie)")
        }
        try context.expectErrno(lookup(array, slot: 7).result, ENOENT, key: "empty_slot_lookup")
        return "cookies match SO_COOKIE, empty slot ENOENT"
    }

    /// A UDP socket that connect()s marks its reuseport group as having connections
    /// (reuseport_has_conns_set(), net/ipv4/datagram.c); the UDP lookup then scores every
    /// socket instead of trusting the reuseport selection (udp4_lib_lookup2(), net/ipv4/udp.c),
    /// and a connected socket wins for its own peer. This check records what happens in
    /// two cases: a foreign socket of the group connects to one client; a slot's own socket
    /// connects to one client. It fails only if the measurement itself fails.
    static let connectedUDP = Check(
        "connected-udp", "records what a connected UDP socket in the group does to steering (foreign / slot socket)"
    ) { context in
        let slots = 4
        let flows = 128
        let plane = try service(slots: slots)
        let destination = plane.listeners[0].endpoint.address
        let snapshot = try plane.snapshot()
        let clients = try Traffic.clients(flows, on: .loopbackV4)
        func predicted(_ client: FlowClient) -> UInt32 {
            snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination)).slot!
        }
        func connect(_ socket: ReuseportSocket, to peer: SocketAddress) throws {
            try Syscall.connect(socket.fd, peer, "\(peer)")
        }
        func send(round: Int, to sockets: [UInt32: ReuseportSocket]) throws -> [SocketAddress: UInt32] {
            for client in clients { try client.send(Array("c\(round)".utf8), to: destination) }
            var landed: [SocketAddress: UInt32] = [:]
            for delivery in try Traffic.receive(from: sockets, expected: flows, idleMs: 500) {
                landed[delivery.source] = delivery.slot
            }
            return landed
        }

        // Case 1: a foreign socket joins the group and connects to client 0.
        let foreign = try Fixture.socket(plane.listeners[0].endpoint)
        try connect(foreign, to: clients[0].local)
        let foreignSlot: UInt32 = 99
        var all = plane.listeners[0].sockets
        all[foreignSlot] = foreign
        let first = try send(round: 1, to: all)
        let peerWent = first[clients[0].local].map { $0 == foreignSlot ? "connected-socket" : "slot\($0)" } ?? "lost"
        let othersKept = clients.dropFirst().filter { first[$0.local] == predicted($0) }.count
        let othersToForeign = clients.dropFirst().filter { first[$0.local] == foreignSlot }.count
        context.record("foreign_connected.peer_went_to", peerWent)
        context.record("foreign_connected.others_on_predicted_slot", "\(othersKept)/\(flows - 1)")
        context.record("foreign_connected.others_to_foreign", othersToForeign)
        context.record("foreign_connected.lost", flows - first.count)
        // Can a connected socket enter the array?
        let insert = update(plane.listeners[0].program.sockets, slot: UInt32(slots), fd: foreign.fd.rawValue)
        context.record("array_insert_connected", insert == 0 ? "accepted" : errnoName(insert))
        if insert == 0 { try plane.listeners[0].program.sockets.remove(at: UInt32(slots)) }
        foreign.close()
        all.removeValue(forKey: foreignSlot)

        // Case 2: the socket at slot 1 (a worker's) connects to a client whose flow is on slot 2.
        guard let peer = clients.first(where: { predicted($0) == 2 }) else {
            throw CheckFailure(description: "no flow of \(flows) is on slot 2")
        }
        let globalBefore = try plane.maps.globalCounters()
        try connect(plane.listeners[0].sockets[1]!, to: peer.local)
        let stillInArray = try plane.listeners[0].program.sockets.cookie(at: 1) != nil
        let second = try send(round: 2, to: all)
        let globalAfter = try plane.maps.globalCounters()
        let onSlot1 = clients.filter { predicted($0) == 1 }
        let slot1Kept = onSlot1.filter { second[$0.local] == 1 }.count
        let wentTo = Dictionary(grouping: onSlot1.compactMap { second[$0.local] }, by: { $0 })
            .sorted { $0.key < $1.key }.map { "slot\($0.key):\($0.value.count)" }.joined(separator: ",")
        context.record("slot_connected.still_in_array", stillInArray ? "yes" : "no")
        context.record("slot_connected.its_flows_went_to", wentTo.isEmpty ? "nowhere" : wentTo)
        context.record("slot_connected.program_fallbacks", globalAfter.fallbacks - globalBefore.fallbacks)
        context.record("slot_connected.program_select_errors", globalAfter.select_errors - globalBefore.select_errors)
        let othersKeptAfter = clients.filter { predicted($0) != 1 && $0 !== peer }
            .filter { second[$0.local] == predicted($0) }.count
        let slotPeerWent = second[peer.local].map { "slot\($0)" } ?? "lost"
        // The peer's flow is predicted on slot 2; the socket connected to it is slot 1's.
        context.record("slot_connected.peer_went_to", slotPeerWent)
        context.record("slot_connected.its_flows_kept", "\(slot1Kept)/\(onSlot1.count)")
        context.record("slot_connected.other_flows_kept", "\(othersKeptAfter)/\(flows - onSlot1.count - 1)")
        context.record("slot_connected.lost", flows - second.count)
        return "foreign connected: peer->\(peerWent), \(othersKept)/\(flows - 1) others kept; "
            + "slot 1 connected: its flows kept \(slot1Kept)/\(onSlot1.count), peer->\(slotPeerWent), "
            + "lost \(flows - second.count)"
    }
}
