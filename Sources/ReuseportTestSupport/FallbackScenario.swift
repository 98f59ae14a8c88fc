import ReuseportKit

/// A scenario's expectation that did not hold: what was expected and what was seen.
public struct ScenarioFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Throws `ScenarioFailure(message)` unless `condition` holds.
public func require(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw ScenarioFailure(message()) }
}

/// Empty slots fall back through rp_fallback, deterministically: written once, run by a
/// `@Test` on the running kernel and by kernel-check on every kernel of the VM matrix.
public enum FallbackScenario {
    /// Empties `emptied` (each through `ServiceDataPlane.closeSlot`, which takes it out of the
    /// fallback table before its socket leaves), then checks, with one datagram per client:
    /// - every flow lands where `SteeringSnapshot.placement` (what `which` answers) says;
    /// - the flows of an emptied slot fall back to a live slot, all others stay where they were;
    /// - the fallback counters, per slot and global, count exactly the flows that fell back;
    /// - the same flows fall back to the same slots again;
    /// - refilling the slots brings every flow back to where it was.
    /// Clients send to `destination` (default: the listener's address). Returns a one-line summary.
    @discardableResult
    public static func run(_ plane: ServiceDataPlane, clients: [FlowClient], emptied: [UInt32],
                           destination: SocketAddress? = nil) throws -> String {
        let destination = destination ?? plane.listeners[0].endpoint.address
        let before = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        try require(before.count == clients.count, "before: \(before.count) of \(clients.count) flows arrived")
        for slot in emptied { try plane.closeSlot(slot) }

        let snapshot = try plane.snapshot()
        let live = Set(plane.slots).subtracting(emptied)
        try require(snapshot.liveSlots == live, "live slots \(snapshot.liveSlots.sorted()), expected \(live.sorted())")
        let during = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        var fellBack = 0
        for client in clients {
            let placement = snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination))
            try require(during[client.local] == placement.slot,
                        "\(client.local) landed on \(during[client.local].map(String.init) ?? "nothing"), "
                            + "predicted \(placement.slot.map(String.init) ?? "a drop")")
            if let slot = before[client.local], emptied.contains(slot) {
                fellBack += 1
                try require(placement.isFallback && live.contains(placement.slot ?? .max),
                            "\(client.local) of emptied slot \(slot) is predicted on \(String(describing: placement.slot))")
            } else {
                try require(during[client.local] == before[client.local],
                            "\(client.local) moved from \(before[client.local]!) though its slot is live")
            }
        }
        try require(fellBack > 0, "no client was on an emptied slot: the scenario proves nothing")
        let perSlot = try live.map { try plane.maps.slotCounters($0).fallbacks }.reduce(0, +)
        let global = try plane.maps.globalCounters().fallbacks
        try require(perSlot == UInt64(fellBack) && global == UInt64(fellBack),
                    "fallback counters: per slot \(perSlot), global \(global); \(fellBack) flows fell back")
        let again = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        try require(again == during, "the same flows fell back elsewhere the second time")

        for slot in emptied { try plane.reopenSlot(slot) }
        let restored = try Traffic.slotsOf(clients: clients, sending: destination, sockets: plane.listeners[0].sockets)
        try require(restored == before, "after refilling, \(clients.filter { restored[$0.local] != before[$0.local] }.count) "
                        + "flows are not back on their slot")
        return "\(fellBack) of \(clients.count) flows fell back from slots \(emptied) to the predicted slot, "
            + "counted; all back after refilling"
    }
}
