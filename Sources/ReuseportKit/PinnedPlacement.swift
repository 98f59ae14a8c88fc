import CReuseportABI

/// What a daemon's pins say about a service's placement, read at once: the maps a later daemon
/// resumes (`PlacementModel(resuming:)`), and what `PlacementModel.pinnedImage` derives from a
/// placement. Reading a model back from its own image gives the same placement, less what is
/// not resumed on purpose (PlacementModelTests).
public struct PinnedPlacement: Sendable {
    public var config: rp_config
    public var change: rp_transition
    /// rp_slot_state's rows that name a worker state, below `socketSlots`.
    public var rows: [UInt32: rp_slot_state]
    /// Every slot the pins name is below this (`ServiceDataPlane.pinnedSlotBound`).
    public var socketSlots: Int
    /// rp_buckets' values (slot and flags), `bucketCount` of them.
    public var bucketValues: [UInt32]
    /// rp_next_buckets, read while a change learns.
    public var nextBuckets: [UInt32]?
    public var fallback: [UInt32]
    /// The canary rp_canary and rp_canary_buckets record (`CanaryRecords`), if one learned or baked.
    public var canary: PinnedCanary?

    public init(config: rp_config, change: rp_transition, rows: [UInt32: rp_slot_state], socketSlots: Int,
                bucketValues: [UInt32], nextBuckets: [UInt32]?, fallback: [UInt32], canary: PinnedCanary? = nil) {
        self.config = config
        self.change = change
        self.rows = rows
        self.socketSlots = socketSlots
        self.bucketValues = bucketValues
        self.nextBuckets = nextBuckets
        self.fallback = fallback
        self.canary = canary
    }

    /// Reads the pinned maps of a service whose configuration has `bucketCount` buckets; `canary`
    /// is what its canary records say (`CanaryRecords.pinned`).
    public init(reading maps: DispatchMaps, bucketCount: Int, canary: PinnedCanary? = nil) throws {
        self.canary = canary
        config = try maps.readConfig()
        change = try maps.readTransition()
        let nominal = try SlotCount(Int(config.slot_count)).value
        socketSlots = try SlotCount(max(ServiceDataPlane.pinnedSlotBound(maps), nominal), what: "socket_slots").value
        var rows: [UInt32: rp_slot_state] = [:]
        for slot in 0..<UInt32(socketSlots) {
            if let row = try? maps.readSlotState(slot), row.state != RP_WORKER_EMPTY.rawValue { rows[slot] = row }
        }
        self.rows = rows
        bucketValues = try maps.readBucketValues(count: bucketCount)
        nextBuckets = change.phase == RP_TRANSITION_LEARNING.rawValue ? try maps.readNextBuckets(count: bucketCount) : nil
        fallback = try maps.readFallback()
    }
}

extension PlacementModel {
    /// The placement a previous daemon left in its pins. The slots its rows name hold sockets,
    /// each with its row's generation, and so do `existing` slots (adopted sockets stay at their
    /// slot, named by a row or not); the rows also say which slots are the set (RP_SLOT_IN_SET).
    /// A change that was learning goes on to its switch; one that was draining goes on retiring
    /// its leaving slots. Not resumed: failover (every slot starts afresh; lent buckets stay
    /// where they are, so no flow moves) and a starting generation (its slots leave, as no flow
    /// reached them), unless it is the canary the records name (`resumeCanary`): then its slots
    /// stay a starting generation's, with its buckets. Slots that leave with no change running leave
    /// as a change that starts `now`: the daemon's check retires them once no record names them,
    /// which, with no change before, is at its first check.
    public init(resuming pinned: PinnedPlacement, tracking: FlowTracking, hasUDP: Bool, existing: Set<UInt32> = [],
                now: Int64) throws
    {
        let nominal = try SlotCount(Int(pinned.config.slot_count)).value
        let bucketCount = pinned.bucketValues.count
        try self.init(bucketCount: bucketCount, slotCount: nominal, tracking: tracking, hasUDP: hasUDP)
        let change = pinned.change
        let rows = pinned.rows
        workingGeneration = max(change.working_generation, 1)
        lastGeneration = max(change.last_generation, workingGeneration)
        // The rows say which slots are the set. Pins of a daemon that did not mark them: the
        // working generation's rows that neither leave nor join, then any of the working
        // generation (a slot leaving a change's set still has its generation), then 0..<n.
        let workingNow = workingGeneration
        let inSet = rows.filter { $0.value.flags & UInt32(RP_SLOT_IN_SET) != 0 }.keys.sorted()
        let moving = UInt32(RP_SLOT_LEAVING) | UInt32(RP_SLOT_JOINING)
        let staying = rows.filter { $0.value.generation == workingNow && $0.value.flags & moving == 0 }.keys.sorted()
        let working = rows.filter { $0.value.generation == workingNow }.keys.sorted()
        slots = [inSet, staying, working].first { $0.count == nominal } ?? Array(0..<UInt32(nominal))
        buckets = pinned.bucketValues.map { rp_bucket_slot($0) }
        effectiveBuckets = buckets
        bucketFlags = pinned.bucketValues.map { $0 & UInt32(RP_BUCKET_FLAGS) }
        fallback = pinned.fallback
        transitionStartedNs = change.phase == RP_TRANSITION_NONE.rawValue ? nil : Int64(change.started_ns)
        // The change finishes with the idle timeout it started with; the file's applies after it.
        if change.phase != RP_TRANSITION_NONE.rawValue, change.idle_timeout_ns > 0,
           Int(change.idle_timeout_ns / 1_000_000) != tracking.idleTimeoutMs {
            deferredTracking = tracking
            self.tracking.idleTimeoutMs = Int(change.idle_timeout_ns / 1_000_000)
        }
        if change.phase == RP_TRANSITION_LEARNING.rawValue, let next = pinned.nextBuckets {
            let after = try SlotCount(Int(change.slots_after), what: "slots_after").value
            // rp_next_buckets holds the table the switch writes (failover laid over it already).
            // The rows name the target (RP_SLOT_IN_NEXT_SET); pins of a daemon that did not mark
            // it: the slots rp_next_buckets names, then 0..<n.
            let marked = rows.filter { $0.value.flags & UInt32(RP_SLOT_IN_NEXT_SET) != 0 }.keys.sorted()
            let named = Set(next).sorted()
            let target = [marked, named].first { $0.count == after } ?? Array(0..<UInt32(after))
            pending = PendingPlacement(buckets: next, slots: target, failed: [], switchNs: Int64(change.switch_ns))
            // A generation change that was learning: its slots' rows name the generation it makes working.
            pendingGeneration = target.compactMap { rows[$0]?.generation }.first { $0 != workingNow }
        } else {
            drainDeadlineNs = change.drain_deadline_ns == 0 ? nil : Int64(change.drain_deadline_ns)
        }
        if let record = pinned.canary { resumeCanary(record, rows: rows, change: change, next: pinned.nextBuckets) }
        let held = rows.isEmpty ? Set(0..<UInt32(pinned.socketSlots)) : Set(rows.keys)
        slotGenerations = [:]
        for slot in held.union(slots).union(pending?.slots ?? []).union(existing) {
            slotGenerations[slot] = rows[slot]?.generation ?? workingNow
        }
        leaving = Set(liveSlots).subtracting(slots).subtracting(pending?.slots ?? []).subtracting(canary?.slots ?? [])
        if !leaving.isEmpty, transitionStartedNs == nil { transitionStartedNs = now }
    }

    /// Takes back the canary `record` names, if the pins agree with it: its generation is not
    /// the working one and has slots (rows of its generation, outside the set); switched (it
    /// bakes), each of its buckets names in rp_buckets the canary slot promotion gives it, as it
    /// did when it started (the table promotion rebalances is rp_buckets with each canary
    /// bucket's slot before it, which the record keeps); learning, rp_next_buckets names them so
    /// and rp_buckets does not yet. Otherwise the canary is not resumed: its slots leave as a
    /// starting generation's, and its buckets go back as after a failover (`isStarved`).
    mutating func resumeCanary(_ record: PinnedCanary, rows: [UInt32: rp_slot_state], change: rp_transition,
                               next: [UInt32]?) {
        let set = Set(slots)
        let canarySlots = rows.filter { $0.value.generation == record.generation }.keys.sorted()
        guard record.generation != workingGeneration, record.previous == workingGeneration, !canarySlots.isEmpty,
              set.isDisjoint(with: canarySlots), record.original.keys.allSatisfy({ buckets.indices.contains($0) })
        else { return }
        let learning = record.phase == .learning
        guard learning == (change.phase == RP_TRANSITION_LEARNING.rawValue) else { return }
        // The table the canary's buckets are laid over: the switched (or pending) table with each
        // of them back at the slot it named before.
        var nominal = learning ? (next ?? []) : buckets
        guard nominal.count == bucketCount else { return }
        for (bucket, slot) in record.original { nominal[bucket] = slot }
        let promoted = BucketAssignment.rebalance(nominal, to: canarySlots)
        let laid = learning ? next! : buckets
        guard record.original.keys.allSatisfy({ laid[$0] == promoted[$0] }) else { return }
        var placement = CanaryPlacement(generation: record.generation, slots: canarySlots,
                                        buckets: record.original.keys.sorted(), promoted: promoted,
                                        original: record.original)
        if learning, var change = pending {
            change.buckets = nominal
            change.canary = placement.assignment
            pending = change
        } else {
            placement.switched = true
            buckets = nominal
        }
        canary = placement
        startingGeneration = StartingGeneration(generation: record.generation, slots: canarySlots)
        lastGeneration = max(lastGeneration, record.generation)
    }

    /// What this placement's pins say, as `ServiceDataPlane` writes them: rp_config, rp_transition,
    /// the tables, and a row per slot holding a socket with its generation and flags (`state`:
    /// the worker state the rows carry; the placement does not know workers).
    public func pinnedImage(seed: UInt32 = 0, state: UInt32 = RP_WORKER_RUNNING.rawValue) -> PinnedPlacement {
        var config = rp_config()
        config.seed = seed
        config.bucket_count = UInt32(bucketCount)
        config.slot_count = UInt32(slots.count)
        var rows: [UInt32: rp_slot_state] = [:]
        for (slot, generation) in slotGenerations {
            var row = rp_slot_state()
            row.state = state
            row.generation = generation
            row.flags = rowFlags(of: slot)
            rows[slot] = row
        }
        let record = transitionRecord
        return PinnedPlacement(config: config, change: record, rows: rows,
                               socketSlots: max(Int(record.socket_slots), slots.count), bucketValues: bucketValues,
                               nextBuckets: pending?.effective, fallback: fallback)
    }
}
