import ReuseportKit

/// A generation change keeps every live flow on its old slot and gives new flows only to the
/// new generation, and a starting generation takes no flow at all: written once, run by a
/// `@Test` on the running kernel and by kernel-check on every kernel of the VM matrix. No new
/// program is needed for it: it is a placement change of every bucket.
public enum GenerationScenario {
    /// Starts a generation as large as the working one beside it:
    /// - while it starts, neither table names its slots, and no datagram (old flow or new)
    ///   reaches them;
    /// - while the switch learns, every bucket records its flows, each with its slot;
    /// - after the switch every old flow still lands on its slot (pinned), `fresh` clients land
    ///   where the new table says, all on the new slots, and the old slots are leaving;
    /// - once the records are idle the old slots retire and the change ends.
    @discardableResult
    public static func run(_ plane: ServiceDataPlane, clients: [FlowClient], fresh: [FlowClient],
                           destination: SocketAddress? = nil) throws -> String {
        let destination = destination ?? plane.listeners[0].endpoint.address
        let sockets = { plane.listeners[0].sockets }
        let old = plane.slots
        let before = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(before.count == clients.count, "before: \(before.count) of \(clients.count) flows arrived")
        let now = MonotonicClock.nanoseconds()
        let starting = try plane.startGeneration(count: old.count, now: now)
        let new = Set(starting.slots)
        let named = Set(try plane.maps.readBuckets()).union(try plane.maps.readFallback())
        try require(named.isDisjoint(with: new), "a table names a starting slot: \(named.intersection(new).sorted())")
        let meanwhile = try Traffic.slotsOf(clients: clients + fresh, sending: destination, sockets: sockets())
        let reached = meanwhile.values.filter { new.contains($0) }.count
        try require(reached == 0, "\(reached) flows reached the starting generation")

        try plane.switchGeneration(now: now, learnNs: 3_600_000_000_000)
        let learning = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(learning == before, "a flow moved while learning")
        let records = try FlowRecords.read(plane.maps)
        try require(records.count == clients.count, "\(records.count) records; \(clients.count) live flows")

        try plane.advance(now: now, force: true)
        try require(plane.workingGeneration == starting.generation && Set(plane.leaving) == Set(old),
                    "generation \(plane.workingGeneration) works, leaving \(plane.leaving.sorted())")
        let after = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(after == before, "\(clients.filter { after[$0.local] != before[$0.local] }.count) flows moved at the switch")
        let snapshot = try plane.snapshot()
        let landed = try Traffic.slotsOf(clients: fresh, sending: destination, sockets: sockets())
        for client in fresh {
            let predicted = snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination)).slot
            try require(landed[client.local] == predicted && predicted.map(new.contains) == true,
                        "new flow \(client.local) on \(String(describing: landed[client.local])), table says \(String(describing: predicted))")
        }

        let later = now + 7_200_000_000_000
        _ = try plane.sweep(now: later)
        for slot in old { for socket in try plane.retire(slot, now: later) { socket.close() } }
        let sweep = try plane.sweep(now: later)
        try require(sweep.finished, "the change did not end once the old slots retired: \(sweep)")
        return "\(clients.count) live flows kept their slot through the switch to generation \(starting.generation) "
            + "(slots \(starting.slots.map(String.init).joined(separator: ","))); none reached it while it started; "
            + "\(fresh.count) new flows on it"
    }
}
