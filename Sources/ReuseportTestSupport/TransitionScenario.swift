import ReuseportKit

/// A placement change keeps recorded flows where they were: written once, run by a `@Test` on
/// the running kernel and by kernel-check on every kernel of the VM matrix (the program's flow
/// records: a hash table without preallocation, updated from an SK_REUSEPORT program).
public enum TransitionScenario {
    /// Grows `plane` by two slots as a change, with one datagram per client at each step:
    /// - while the moving buckets learn, every flow stays put, and exactly the flows of moving
    ///   buckets are recorded (rp_flow_stats.recorded), each with its slot;
    /// - after the switch, every client still lands on its first slot (pinned by its record,
    ///   counted in rp_flow_stats.pinned), and `fresh` clients land where the new table says;
    /// - once the records are swept as idle, the change ends: no flag, no record is left.
    @discardableResult
    public static func run(_ plane: ServiceDataPlane, clients: [FlowClient], fresh: [FlowClient],
                           destination: SocketAddress? = nil) throws -> String {
        let destination = destination ?? plane.listeners[0].endpoint.address
        let sockets = { plane.listeners[0].sockets }
        let before = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(before.count == clients.count, "before: \(before.count) of \(clients.count) flows arrived")
        let now = MonotonicClock.nanoseconds()
        let plan = try plane.beginResize(to: plane.slots.count + 2, now: now, learnNs: 3_600_000_000_000)
        let target = try require(plane.pending, "the change is pending")
        let seed = try plane.maps.readConfig().seed
        let count = UInt32(plane.buckets.count)
        let moving = clients.filter { client in
            let flow = FlowTuple(.udp, from: client.local, to: destination)
            let bucket = Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: seed), count: count))
            return target.effective[bucket] != plane.effectiveBuckets[bucket]
        }
        try require(!moving.isEmpty && plan.movingBuckets > 0, "no client is in a moving bucket: proves nothing")

        let learning = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(learning == before, "a flow moved while learning")
        let records = try FlowRecords.read(plane.maps)
        let recorded = try plane.maps.flowCounters().recorded
        try require(records.count == moving.count && recorded == UInt64(moving.count),
                    "\(records.count) records (counter \(recorded)); \(moving.count) flows move")
        for record in records {
            try require(before[record.flow.source] == record.slot,
                        "\(record.flow.source) recorded on slot \(record.slot), it was on \(String(describing: before[record.flow.source]))")
        }

        try plane.advance(now: now, force: true)
        let after = try Traffic.slotsOf(clients: clients, sending: destination, sockets: sockets())
        try require(after == before, "\(clients.filter { after[$0.local] != before[$0.local] }.count) flows moved at the switch")
        let pinned = try plane.maps.flowCounters().pinned
        try require(pinned == UInt64(moving.count), "pinned packets \(pinned), expected \(moving.count)")
        let snapshot = try plane.snapshot()
        let landed = try Traffic.slotsOf(clients: fresh, sending: destination, sockets: sockets())
        for client in fresh {
            let predicted = snapshot.placement(of: FlowTuple(.udp, from: client.local, to: destination)).slot
            try require(landed[client.local] == predicted, "new flow \(client.local) on \(String(describing: landed[client.local])), table says \(String(describing: predicted))")
        }
        let onNew = fresh.filter { (landed[$0.local] ?? 0) >= UInt32(plane.slots.count - 2) }.count
        try require(onNew > 0, "no new flow went to the new slots")

        // All records idle: the sweep ends the change.
        let sweep = try plane.sweep(now: now + 7_200_000_000_000)
        try require(sweep.finished && sweep.live == 0, "the change did not end once every record was idle: \(sweep)")
        let left = try FlowRecords.count(plane.maps)
        try require(left == 0, "\(left) records left after the change")
        let flagged = try plane.maps.readBucketValues().filter { $0 & UInt32(RP_BUCKET_FLAGS) != 0 }.count
        try require(flagged == 0, "\(flagged) buckets still flagged after the change")
        return "\(moving.count) of \(clients.count) flows in moving buckets recorded and kept through the switch; "
            + "\(onNew) of \(fresh.count) new flows on the new slots"
    }
}

/// `require` for an optional: its value, or a ScenarioFailure.
public func require<T>(_ value: T?, _ message: @autoclosure () -> String) throws -> T {
    guard let value else { throw ScenarioFailure(message()) }
    return value
}
