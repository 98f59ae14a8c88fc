import CReuseportABI

/// What one service's placement *is*, as a value: which slots hold sockets and of which
/// generation, the bucket tables, the failover overlay, and the placement change in progress.
///
/// Every operation on it is a pure function: it checks its arguments, computes the next
/// placement, and returns the kernel writes that take the maps from the old placement to the
/// new one, in the order that keeps every packet steerable (`PlacementEffect`). It reads no
/// map and no clock: `now` and the live records it needs are arguments. `ServiceDataPlane`
/// owns the kernel objects and carries the writes out; tests drive this type alone, by the
/// thousand operations, without root (PlacementModelTests).
///
/// The orders that matter, each kept by the operations below:
/// - a slot's sockets enter the arrays before any table names the slot, and leave them only
///   after no table names it (`spreadFallback` writes the fallback table first, then rp_config's
///   live count);
/// - the buckets that move at a switch are pinned in the same write, so that a recorded flow
///   never sees its bucket's new slot;
/// - rp_transition (`writeTransition`) is written last: it describes the placement once the
///   tables say it, for a later daemon to resume (`init(resuming:)`).
public struct PlacementModel: Sendable, Equatable {
    public typealias FlowTracking = ServiceDataPlane.FlowTracking

    public let bucketCount: Int
    /// How many slots the service's slot-indexed maps hold (`SlotCapacity`): every slot an
    /// operation takes is below it, and one that needs more is refused (its data plane sets it).
    public internal(set) var slotCapacity = Int(RP_MAX_SLOTS)
    /// The tracking settings in force: a change runs with those it started with.
    public internal(set) var tracking: FlowTracking
    /// Settings given while a change ran, applied when it ends.
    public internal(set) var deferredTracking: FlowTracking?
    /// The service has a UDP listener: only UDP flows are recorded (a TCP connection, once
    /// accepted, never moves; SYNs simply follow the table).
    public let hasUDP: Bool

    /// The slot set: where the working generation's buckets point (nominally).
    public internal(set) var slots: [UInt32]
    /// The nominal bucket table: where each bucket's flows belong.
    public internal(set) var buckets: [UInt32]
    /// Slots whose buckets are lent to the other slots of the set.
    public internal(set) var failedOver: Set<UInt32> = []
    /// The table rp_buckets holds (without flags): `buckets` with the failover laid over it.
    public internal(set) var effectiveBuckets: [UInt32]
    /// The table rp_fallback holds.
    public internal(set) var fallback: [UInt32]
    /// Each bucket's part in a change (RP_BUCKET_LEARN, RP_BUCKET_PINNED); all 0 in steady state.
    public internal(set) var bucketFlags: [UInt32]
    /// The change being learned: what the switch will write.
    public internal(set) var pending: PendingPlacement?
    /// Slots that hold sockets but left the set: their recorded flows still go there.
    public internal(set) var leaving: Set<UInt32> = []
    /// When the leaving slots retire, records or not (CLOCK_MONOTONIC); nil before a switch or
    /// with no limit.
    public internal(set) var drainDeadlineNs: Int64?
    /// When the current change started (CLOCK_MONOTONIC); nil in steady state.
    public internal(set) var transitionStartedNs: Int64?
    /// The generation taking new flows, and the last number given out.
    public internal(set) var workingGeneration: UInt32 = 1
    public internal(set) var lastGeneration: UInt32 = 1
    /// The slots that hold sockets, each with its generation.
    public internal(set) var slotGenerations: [UInt32: UInt32] = [:]
    /// A generation whose slots hold sockets but take no flow yet.
    public internal(set) var startingGeneration: StartingGeneration?
    /// The generation the pending change makes the working one at its switch.
    public internal(set) var pendingGeneration: UInt32?
    /// Slots whose sockets were closed on purpose (`closeSlot`) while tables still name them:
    /// their flows take the fallback table. The tests of the fallback path make such holes; the
    /// daemon never does.
    public internal(set) var closed: Set<UInt32> = []
    /// A canary: the starting generation takes the new flows of a share of the buckets while it
    /// bakes (CanaryPlacement.swift); nil otherwise.
    public internal(set) var canary: CanaryPlacement?

    /// A fresh placement of `slotCount` slots, 0..<slotCount, not yet written anywhere:
    /// `initialEffects()` writes it.
    public init(bucketCount: Int, slotCount: Int, tracking: FlowTracking, hasUDP: Bool) throws {
        _ = try SlotCount(slotCount)
        _ = try BucketCount(bucketCount)
        self.bucketCount = bucketCount
        self.tracking = tracking
        self.hasUDP = hasUDP
        slots = Array(0..<UInt32(slotCount))
        buckets = BucketAssignment.initial(bucketCount: bucketCount, slots: slots)
        effectiveBuckets = buckets
        bucketFlags = Array(repeating: 0, count: bucketCount)
        fallback = BucketAssignment.initial(bucketCount: Int(RP_FALLBACK_BUCKETS), slots: slots)
        for slot in slots { slotGenerations[slot] = workingGeneration }
    }

    /// The writes that put a fresh placement into empty maps.
    public func initialEffects() -> [PlacementEffect] {
        var model = self
        var effects = liveSlots.map { PlacementEffect.insertSockets(slot: $0) }
        effects.append(.writeBuckets(bucketValues, previous: nil))
        effects.append(.writeFallback(fallback, previous: nil))
        effects.append(.writeTransition(transitionRecord))
        effects += model.spreadFallback(over: liveSlots)
        return effects
    }

    // MARK: derived

    /// The slots that hold sockets.
    public var liveSlots: [UInt32] { slotGenerations.keys.sorted() }

    /// Whether changes learn and pin flows: tracking on and a UDP listener.
    public var tracksFlows: Bool { tracking.enabled && hasUDP }

    /// rp_buckets' values: slot and flags.
    public var bucketValues: [UInt32] { zip(effectiveBuckets, bucketFlags).map { $0 | $1 } }

    /// The slots the fallback table may name: holding a socket, and neither leaving nor about
    /// to leave at the switch.
    public var fallbackSlots: [UInt32] { fallbackSlots(staying: pending?.slots ?? slots) }

    func fallbackSlots(staying: [UInt32]) -> [UInt32] {
        let staying = Set(staying)
        return liveSlots.filter { staying.contains($0) && !leaving.contains($0) }
    }

    /// A slot that takes no new flow from the switch on (a scale-down's, or the old generation's
    /// at an upgrade), and retires once drained.
    public func isLeaving(_ slot: UInt32) -> Bool {
        leaving.contains(slot) || pending.map { !$0.slots.contains(slot) } == true
    }

    /// A slot that takes flows from the switch on (a scale-up's, or a new generation's).
    public func isJoining(_ slot: UInt32) -> Bool { !slots.contains(slot) && !leaving.contains(slot) }

    /// Whether the slot's buckets are lent, or will be at the switch of the change being learned.
    public func isFailedOver(_ slot: UInt32) -> Bool { (pending?.failed ?? failedOver).contains(slot) }

    /// The RP_SLOT_* flags of the slot's row in rp_slot_state: what a later daemon reads back
    /// (`init(resuming:)`) to know the set and the slots that leave or join.
    public func rowFlags(of slot: UInt32) -> UInt32 {
        var flags: UInt32 = 0
        if isLeaving(slot) { flags |= UInt32(RP_SLOT_LEAVING) }
        if isJoining(slot) { flags |= UInt32(RP_SLOT_JOINING) }
        if slots.contains(slot) { flags |= UInt32(RP_SLOT_IN_SET) }
        if pending?.slots.contains(slot) == true { flags |= UInt32(RP_SLOT_IN_NEXT_SET) }
        return flags
    }

    /// rp_transition: what a daemon started again needs to finish the change, and, change or
    /// not, which slots it must look at and the generation numbers.
    public var transitionRecord: rp_transition {
        var state = rp_transition()
        // Kept with or without a change: once a generation change has ended, the slots in use
        // are not 0..<slot_count (the new generation's may be 4..7), and a daemon started on
        // these pins adopts the workers of every slot below this bound and none above it.
        state.socket_slots = liveSlots.max().map { $0 + 1 } ?? 0
        if let started = transitionStartedNs {
            state.phase = pending != nil ? RP_TRANSITION_LEARNING.rawValue : RP_TRANSITION_DRAINING.rawValue
            state.slots_after = UInt32((pending?.slots ?? slots).count)
            state.moving_buckets = UInt32(bucketFlags.filter { $0 != 0 }.count)
            state.started_ns = UInt64(started)
            state.switch_ns = UInt64(pending?.switchNs ?? 0)
            state.drain_deadline_ns = UInt64(drainDeadlineNs ?? 0)
            state.idle_timeout_ns = UInt64(tracking.idleTimeoutMs) * 1_000_000
        }
        state.working_generation = workingGeneration
        state.last_generation = lastGeneration
        return state
    }

    // MARK: building blocks

    /// rp_fallback spread over `live` (moving the fewest entries), then rp_config with its live
    /// count. With no live slot the table stays as it is and live_count 0 tells the program to drop.
    mutating func spreadFallback(over live: [UInt32]) -> [PlacementEffect] {
        var effects: [PlacementEffect] = []
        if !live.isEmpty {
            let table = BucketAssignment.rebalance(fallback, to: live)
            effects.append(.writeFallback(table, previous: fallback))
            fallback = table
        }
        effects.append(.writeConfig(slotCount: slots.count, liveCount: live.count, recordCostNs: tracking.recordCostNs,
                                    changing: isChanging))
        return effects
    }

    /// Whether a bucket is flagged: rp_config's RP_CONFIG_CHANGING, without which the program
    /// reads no bucket's flags.
    public var isChanging: Bool { bucketFlags.contains { $0 != 0 } }

    /// rp_buckets becomes `table` with `flags` (default: as they are). RP_CONFIG_CHANGING goes up
    /// before the first flag is written and down after the last is gone: a flag the program
    /// does not read would let a learning bucket's flow go unrecorded, and a pinned one's move.
    mutating func writeEffective(_ table: [UInt32], flags: [UInt32]? = nil) -> [PlacementEffect] {
        let previous = bucketValues
        effectiveBuckets = table
        bucketFlags = flags ?? bucketFlags
        let write = PlacementEffect.writeBuckets(bucketValues, previous: previous)
        return isChanging ? [.writeChanging(true), write] : [write, .writeChanging(false)]
    }

    mutating func insertSockets(_ slot: UInt32, generation: UInt32? = nil) -> PlacementEffect {
        slotGenerations[slot] = generation ?? slotGenerations[slot] ?? workingGeneration
        return .insertSockets(slot: slot)
    }

    mutating func takeSockets(_ slot: UInt32) -> PlacementEffect {
        slotGenerations.removeValue(forKey: slot)
        return .takeSockets(slot: slot)
    }

    mutating func closeSockets(_ slot: UInt32) -> PlacementEffect {
        slotGenerations.removeValue(forKey: slot)
        return .closeSockets(slot: slot)
    }

    // MARK: operations that apply at once

    /// The slot count becomes `count` (slots 0..<count) at once, moving the fewest buckets: new
    /// slots get sockets before any table names them; removed slots lose their buckets and their
    /// fallback entries before their sockets leave (handed to the caller: `takeSockets`). A
    /// failed-over slot stays so; a removed one no longer. Returns the nominal buckets moved.
    public mutating func resize(to count: Int) throws -> (moved: Int, effects: [PlacementEffect]) {
        _ = try SlotCount(count)
        try refuseDuringCanary("resize")
        guard count <= slotCapacity else { throw capacityError(needed: count) }
        let target = Array(0..<UInt32(count))
        let table = BucketAssignment.rebalance(buckets, to: target)
        let failed = failedOver.filter { $0 < UInt32(count) }
        let added = target.filter { !slots.contains($0) }
        var effects = added.map { insertSockets($0) }
        effects += spreadFallback(over: liveSlots)
        effects += writeEffective(BucketAssignment.overlay(table, slots: target, failed: failed))
        let moved = BucketAssignment.moved(from: buckets, to: table)
        let removed = slots.filter { $0 >= UInt32(count) }
        buckets = table
        failedOver = failed
        slots = target
        effects += spreadFallback(over: liveSlots.filter { $0 < UInt32(count) })
        effects += removed.map { takeSockets($0) }
        effects.append(.writeTransition(transitionRecord))
        return (moved, effects)
    }

    /// Replaces the nominal bucket table; rp_buckets gets it with the failover laid over it.
    public mutating func setBuckets(_ table: [UInt32]) throws -> [PlacementEffect] {
        try refuseDuringCanary("replace the bucket table")
        guard table.count == bucketCount else {
            throw ReuseportError.invalidArgument("bucket table has \(table.count) entries, expected \(bucketCount)")
        }
        let effects = writeEffective(BucketAssignment.overlay(table, slots: slots, failed: failedOver))
        buckets = table
        return effects
    }

    /// Lends `slot`'s buckets to the other slots of the set (`failing` true), or gives them back
    /// exactly (false), moving no other bucket. A change being learned keeps its target, with
    /// this slot failed over or back too; a bucket that starts learning now gets a whole idle
    /// timeout. Returns how many buckets moved.
    public mutating func setFailedOver(_ slot: UInt32, failing: Bool, now: Int64) throws
        -> (moved: Int, effects: [PlacementEffect])
    {
        guard slots.contains(slot) || pending?.slots.contains(slot) == true else {
            throw ReuseportError.invalidArgument("slot \(slot) is not in use (slots 0...\(slots.count - 1))")
        }
        let failed = failing ? failedOver.union([slot]) : failedOver.subtracting([slot])
        let live = slots.filter { !failed.contains($0) }
        // Failing, only this slot's buckets move, lent from the table as it is. The nominal
        // table's overlay for the new set of failed slots would also lend an earlier failed
        // slot's buckets elsewhere, and a rebalance would take buckets from a slot holding more
        // than its share: either moves live flows of slots that are up.
        let table = failing && !live.isEmpty
            ? BucketAssignment.lend(effectiveBuckets, from: slot, to: live)
            : keepingOutsideSet(BucketAssignment.overlay(buckets, slots: slots, failed: failed), except: failing ? slot : nil)
        let moved = BucketAssignment.moved(from: effectiveBuckets, to: table)
        var flags = bucketFlags
        var next = pending
        if var change = next {
            // Only a slot of the target is failed over in it: one leaving at the switch has no
            // bucket there to lend.
            if failing && change.slots.contains(slot) { change.failed.insert(slot) } else { change.failed.remove(slot) }
            let target = change.effective
            var newlyLearning = false
            for bucket in flags.indices {
                let learn = tracksFlows && target[bucket] != table[bucket]
                if learn && flags[bucket] & UInt32(RP_BUCKET_LEARN) == 0 { newlyLearning = true }
                flags[bucket] = (flags[bucket] & UInt32(RP_BUCKET_PINNED)) | (learn ? UInt32(RP_BUCKET_LEARN) : 0)
            }
            if newlyLearning {
                change.switchNs = max(change.switchNs, now + Int64(tracking.idleTimeoutMs) * 1_000_000)
            }
            next = change
        }
        var effects = writeEffective(table, flags: flags)
        if let next { effects.append(.writeNextBuckets(next.effective)) }
        failedOver = failed
        pending = next
        if pending != nil { effects.append(.writeTransition(transitionRecord)) }
        return (moved, effects)
    }

    /// The slot's sockets leave the arrays and close; its flows fall back. The fallback table
    /// stops naming it first.
    public mutating func closeSlot(_ slot: UInt32) -> [PlacementEffect] {
        var effects = spreadFallback(over: liveSlots.filter { $0 != slot })
        effects.append(closeSockets(slot))
        closed.insert(slot)
        return effects
    }

    /// A fresh socket at `slot` on every listener (after `closeSlot`, or to replace one).
    public mutating func reopenSlot(_ slot: UInt32) -> [PlacementEffect] {
        var effects = slotGenerations[slot] != nil ? closeSlot(slot) : []
        closed.remove(slot)
        effects.append(insertSockets(slot))
        effects += spreadFallback(over: liveSlots)
        return effects
    }

    /// New tracking settings (not `maxFlows`: rp_flows is sized at load). While a change runs
    /// they wait for its end: the change keeps the settings it started with.
    public mutating func setTracking(_ settings: FlowTracking) -> [PlacementEffect] {
        var settings = settings
        settings.maxFlows = tracking.maxFlows
        guard transitionStartedNs == nil else {
            deferredTracking = settings
            return []
        }
        tracking = settings
        return spreadFallback(over: fallbackSlots)
    }

    // MARK: changes that keep live flows

    /// Starts (or extends) a change to `count` slots. New slots get their sockets now and take
    /// new flows from the switch on; until then the buckets that will move learn their flows
    /// for `learnNs` (default: one idle timeout). Slots beyond `count` leave the fallback table
    /// at once and retire after the switch, once drained. `records`: live records by slot now,
    /// for the plan only.
    public mutating func beginResize(to count: Int, now: Int64, learnNs: Int64? = nil, records: [UInt32: Int] = [:])
        throws -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        if let generation = pendingGeneration {
            throw ReuseportError.invalidArgument("generation \(generation) is learning the live flows it takes over: "
                + "scale once it switched")
        }
        try refuseDuringCanary("scale")
        let base = pending ?? PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now)
        let target = try targetSlots(resizing: base.slots, to: count)
        // A slot failed over now stays so in the target, also one that rejoins it: its worker is down.
        let next = PendingPlacement(buckets: BucketAssignment.rebalance(base.buckets, to: target), slots: target,
                                    failed: base.failed.union(failedOver).intersection(target), switchNs: now)
        let live = Set(liveSlots)
        let effects = target.filter { !live.contains($0) }.map { insertSockets($0) }
        leaving.subtract(target)
        let (plan, planned) = plan(next, now: now, learnNs: learnNs, records: records)
        return (plan, effects + planned)
    }

    /// Whether a slot that takes flows holds fewer than its share of the buckets the placement
    /// switches to: after a restart on pins that had slots failed over, whose lent buckets stay
    /// where they are (failover is not pinned), the new workers of those slots would get no flow.
    public var isStarved: Bool {
        let table = pending?.buckets ?? buckets
        let set = pending?.slots ?? slots
        let up = set.filter { !(pending?.failed ?? failedOver).contains($0) }
        guard !up.isEmpty, table.count >= set.count else { return false }
        // A table read back from pins where a canary ran names its slots, outside the set.
        if canary == nil, table.contains(where: { !set.contains($0) }) { return true }
        var held: [UInt32: Int] = [:]
        for slot in table { held[slot, default: 0] += 1 }
        return up.contains { held[$0, default: 0] < table.count / set.count }
    }

    /// Gives starved slots (`isStarved`) their share back as a change that keeps every live flow:
    /// the same slots, the table rebalanced. Nil when none is starved, or while a generation
    /// change learns (its target is balanced: it is made fresh at its start).
    public mutating func rebalanceIfStarved(now: Int64, records: [UInt32: Int] = [:])
        -> (plan: TransitionPlan, effects: [PlacementEffect])?
    {
        guard isStarved, pendingGeneration == nil, canary == nil else { return nil }
        return try? beginResize(to: (pending?.slots ?? slots).count, now: now, records: records)
    }

    /// Starts giving a failed-over slot its buckets back as a change: the flows the others took
    /// over stay there (recorded); new flows go to the slot from the switch on.
    public mutating func beginRestore(_ slot: UInt32, now: Int64, learnNs: Int64? = nil, records: [UInt32: Int] = [:])
        -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        var next = pending ?? PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now,
                                               canary: canary?.switched == true ? canary!.assignment : [:])
        next.failed.remove(slot)
        return plan(next, now: now, learnNs: learnNs, records: records)
    }

    /// The slots of a change to `count` slots from `base`: the lowest `count` of them when
    /// shrinking; when growing, `base` and the lowest indices held by no other generation (a
    /// leaving slot of the working generation may join again: its worker runs the same program).
    public func targetSlots(resizing base: [UInt32], to count: Int) throws -> [UInt32] {
        _ = try SlotCount(count)
        let sorted = base.sorted()
        guard count > sorted.count else { return Array(sorted.prefix(count)) }
        var target = Set(sorted)
        let starting = Set(startingGeneration?.slots ?? [])
        for candidate in 0..<UInt32(slotCapacity) where target.count < count {
            guard !target.contains(candidate), !starting.contains(candidate) else { continue }
            if let generation = slotGenerations[candidate], generation != workingGeneration { continue }
            target.insert(candidate)
        }
        guard target.count == count else {
            if count > slotCapacity { throw capacityError(needed: count) }
            throw ReuseportError.invalidArgument("no room for \(count) slots: older generations still hold slots, "
                + "and this service's maps hold \(slotCapacity)")
        }
        return target.sorted()
    }

    /// A change needs more slots than the maps hold: what to do about it.
    func capacityError(needed: Int) -> ReuseportError {
        .invalidArgument("the service's maps hold \(slotCapacity) slots (sized from its workers when it was built), "
            + "and this needs \(needed)"
            + (slotCapacity < Int(RP_MAX_SLOTS) ? ": set the worker count in the configuration and reload, which "
                + "rebuilds the service with larger maps, make-before-break" : ""))
    }

    /// Makes `next` the pending placement: flags the buckets that move for learning, writes the
    /// table the switch will write (rp_next_buckets) and the change (rp_transition).
    mutating func plan(_ next: PendingPlacement, now: Int64, learnNs: Int64?, records: [UInt32: Int])
        -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        var next = next
        let learn = tracksFlows ? (learnNs ?? Int64(tracking.idleTimeoutMs) * 1_000_000) : 0
        next.switchNs = now + learn
        let target = next.effective
        var flags = bucketFlags
        var moving = 0
        for bucket in flags.indices {
            let moves = target[bucket] != effectiveBuckets[bucket]
            if moves { moving += 1 }
            flags[bucket] = (flags[bucket] & UInt32(RP_BUCKET_PINNED)) | (moves && learn > 0 ? UInt32(RP_BUCKET_LEARN) : 0)
        }
        let leavingAtSwitch = Set(liveSlots).subtracting(next.slots).subtracting(startingGeneration?.slots ?? [])
        // A slot an earlier target added that this one drops takes no flow now (no table names
        // it) and none after the switch: it leaves at once.
        leaving.formUnion(leavingAtSwitch.subtracting(slots))
        var effects: [PlacementEffect] = []
        // Flows a full table turned away in an earlier change may be recorded in this one.
        if learn > 0 { effects.append(.clearUntrackedMarkers) }
        effects += spreadFallback(over: fallbackSlots(staying: next.slots))
        effects += writeEffective(effectiveBuckets, flags: flags)
        // The table the switch writes, failover included: what a daemon started again switches to.
        effects.append(.writeNextBuckets(target))
        pending = next
        if transitionStartedNs == nil { transitionStartedNs = now }
        effects.append(.writeTransition(transitionRecord))
        let plan = TransitionPlan(movingBuckets: moving, bucketCount: bucketCount, switchNs: next.switchNs,
                                  leaving: leavingAtSwitch.sorted(),
                                  recordedFlowsOnLeaving: leavingAtSwitch.reduce(0) { $0 + (records[$1] ?? 0) })
        return (plan, effects)
    }

    /// Switches a pending change whose learning is over (or any, with `force`): every bucket
    /// takes its new slot, and those that moved are pinned in the same write. Returns the buckets
    /// moved, nil (and no write) when nothing was due. With `drainNow`, the leaving slots'
    /// deadline is now.
    public mutating func advance(now: Int64, force: Bool = false, drainNow: Bool = false)
        -> (moved: Int, effects: [PlacementEffect])?
    {
        guard let next = pending, force || now >= next.switchNs else { return nil }
        let target = next.effective
        var flags = bucketFlags
        var moved = 0
        for bucket in flags.indices {
            if target[bucket] != effectiveBuckets[bucket] {
                moved += 1
                flags[bucket] = tracksFlows ? UInt32(RP_BUCKET_PINNED) : 0
            } else {
                flags[bucket] &= UInt32(RP_BUCKET_PINNED)
            }
        }
        var effects = writeEffective(target, flags: flags)
        if !next.canary.isEmpty { canary?.switched = true }
        buckets = next.buckets
        slots = next.slots
        failedOver = next.failed
        pending = nil
        if let generation = pendingGeneration { workingGeneration = generation }
        pendingGeneration = nil
        leaving.formUnion(Set(liveSlots).subtracting(slots).subtracting(startingGeneration?.slots ?? []))
        // The drain timeout bounds how long leaving slots wait; records of staying slots keep
        // their flows until those are idle, however long that takes.
        let drainMs = tracking.drainTimeoutMs
        drainDeadlineNs = drainNow || !tracksFlows ? now : (drainMs > 0 ? now + Int64(drainMs) * 1_000_000 : nil)
        effects += spreadFallback(over: fallbackSlots)
        effects.append(.writeTransition(transitionRecord))
        return (moved, effects)
    }

    /// The leaving slots that retire now: no live record names them (`liveBySlot`, from the
    /// sweep), or the drain deadline has passed.
    public func slotsToRetire(liveBySlot: [UInt32: Int], now: Int64) -> [UInt32] {
        let deadlinePassed = drainDeadlineNs.map { now >= $0 } == true
        let named = Set(effectiveBuckets)
        return leaving.sorted().filter { ((liveBySlot[$0] ?? 0) == 0 || deadlinePassed) && !named.contains($0) }
    }

    /// A leaving slot's sockets leave the arrays, handed to the caller to drain and close. Its
    /// recorded flows, if any are left, follow the table from now on.
    public mutating func retire(_ slot: UInt32) throws -> [PlacementEffect] {
        guard leaving.contains(slot) else {
            throw ReuseportError.invalidArgument("slot \(slot) is not leaving")
        }
        // A rolled-back canary's slot takes its buckets' new flows until the switch.
        guard !effectiveBuckets.contains(slot) else {
            throw ReuseportError.invalidArgument("slot \(slot) takes new flows until the pending switch: it retires after it")
        }
        let effect = takeSockets(slot)
        leaving.remove(slot)
        return [effect, .writeTransition(transitionRecord)]
    }

    /// Which records a sweep deletes: idle ones, those naming a slot in `forget` (failed over:
    /// its flows have no worker) and those naming a slot that holds no socket (retired at the
    /// drain deadline: they steer nothing any more).
    public func recordIsStale(slot: UInt32, idleNs: UInt64, forget: Set<UInt32>) -> Bool {
        idleNs > UInt64(tracking.idleTimeoutMs) * 1_000_000 || forget.contains(slot) || slotGenerations[slot] == nil
    }

    /// After a sweep found `live` records: once no change is pending or leaving and no record is
    /// live, the change is over. The pinned flags are cleared, every record and untracked marker
    /// goes, and settings deferred during the change apply. Nil when the change goes on.
    public mutating func finishIfDone(live: Int) -> [PlacementEffect]? {
        guard pending == nil, leaving.isEmpty, transitionStartedNs != nil, live == 0 else { return nil }
        var effects = writeEffective(effectiveBuckets, flags: Array(repeating: 0, count: bucketFlags.count))
        effects += [.clearRecords, .clearUntrackedMarkers]
        transitionStartedNs = nil
        drainDeadlineNs = nil
        if let deferred = deferredTracking {
            deferredTracking = nil
            tracking = deferred
            effects += spreadFallback(over: fallbackSlots)
        }
        effects.append(.writeTransition(transitionRecord))
        return effects
    }

    // MARK: generations

    /// Generations older than the working one that may hold slots at once.
    public static let maxDrainingGenerations = 3

    /// Numbers go on from a previous plane's (its pins, or the plane a reload replaces); the
    /// working generation keeps its number. Only before any other generation started here.
    public mutating func continueGenerations(working: UInt32, last: UInt32) throws -> [PlacementEffect] {
        guard startingGeneration == nil, Set(slotGenerations.values).count <= 1 else {
            throw ReuseportError.invalidArgument("the generations of this plane have started already")
        }
        workingGeneration = max(working, 1)
        lastGeneration = max(last, workingGeneration)
        for slot in slotGenerations.keys { slotGenerations[slot] = workingGeneration }
        return [.writeTransition(transitionRecord)]
    }

    /// A new generation of `count` slots beside the working one: the next number, and sockets at
    /// the lowest indices no slot holds. No table names them until `switchGeneration`.
    public mutating func startGeneration(count: Int) throws -> (starting: StartingGeneration, effects: [PlacementEffect]) {
        _ = try SlotCount(count)
        if let starting = startingGeneration {
            throw ReuseportError.invalidArgument("generation \(starting.generation) is starting already")
        }
        guard pending == nil else {
            throw ReuseportError.invalidArgument("a placement change is learning its live flows: start the "
                + "generation once it switched")
        }
        let draining = Set(slotGenerations.values).subtracting([workingGeneration]).sorted()
        guard draining.count < Self.maxDrainingGenerations else {
            throw ReuseportError.invalidArgument("generations \(draining.map(String.init).joined(separator: ", ")) "
                + "still drain, and at most \(Self.maxDrainingGenerations) may: start the next once one has retired "
                + "(its flows idle, or at drain_timeout_ms)")
        }
        let held = Set(liveSlots)
        let free = Array((0..<UInt32(slotCapacity)).lazy.filter { !held.contains($0) }.prefix(count))
        guard free.count == count else {
            if held.count + count > slotCapacity && slotCapacity < Int(RP_MAX_SLOTS) {
                throw capacityError(needed: held.count + count)
            }
            throw ReuseportError.invalidArgument("no room for \(count) more slots beside the \(held.count) held "
                + "(this service's maps hold \(slotCapacity)); wait until older generations have drained")
        }
        let generation = lastGeneration &+ 1
        var effects = free.map { insertSockets($0, generation: generation) }
        lastGeneration = generation
        let starting = StartingGeneration(generation: generation, slots: free)
        startingGeneration = starting
        effects.append(.writeTransition(transitionRecord))
        return (starting, effects)
    }

    /// Gives up the starting generation: its sockets close. No flow was ever steered to them.
    public mutating func abandonGeneration() -> [PlacementEffect] {
        guard let starting = startingGeneration else { return [] }
        // A canary's slots take flows: it is rolled back (rollBackCanary), which keeps them.
        guard canary == nil else { return [] }
        startingGeneration = nil
        return starting.slots.map { closeSockets($0) } + [.writeTransition(transitionRecord)]
    }

    /// Makes the starting generation the working one, as a change of every bucket: the buckets
    /// learn the live flows of the slots they name now, then switch to the new generation's slots
    /// (balanced), and the old slots leave as in a scale-down.
    public mutating func switchGeneration(now: Int64, learnNs: Int64? = nil, records: [UInt32: Int] = [:]) throws
        -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        guard let starting = startingGeneration else {
            throw ReuseportError.invalidArgument("no generation is starting")
        }
        if let canary {
            guard canary.switched, pending == nil else {
                throw ReuseportError.invalidArgument("generation \(canary.generation)'s canary is learning the live "
                    + "flows of its buckets: promote it once it switched")
            }
            self.canary = nil
        }
        let result = changeGeneration(to: starting.slots, generation: starting.generation, now: now, learnNs: learnNs,
                                      records: records)
        startingGeneration = nil
        return (result.plan, result.effects + [.writeTransition(transitionRecord)])
    }

    /// Makes a generation whose slots are still leaving the working one again; the generation
    /// working now leaves, its live flows kept until idle.
    public mutating func rollBack(to generation: UInt32, now: Int64, learnNs: Int64? = nil,
                                  records: [UInt32: Int] = [:]) throws
        -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        guard startingGeneration == nil, pending == nil else {
            throw ReuseportError.invalidArgument("a generation is starting or a change is learning: roll back once it switched")
        }
        let target = liveSlots.filter { slotGenerations[$0] == generation && leaving.contains($0) }
        guard !target.isEmpty, generation != workingGeneration else {
            throw ReuseportError.invalidArgument("generation \(generation) has no slot left to roll back to")
        }
        return changeGeneration(to: target, generation: generation, now: now, learnNs: learnNs, records: records)
    }

    private mutating func changeGeneration(to target: [UInt32], generation: UInt32, now: Int64, learnNs: Int64?,
                                           records: [UInt32: Int]) -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        let next = PendingPlacement(buckets: BucketAssignment.rebalance(buckets, to: target), slots: target,
                                    failed: [], switchNs: now)
        leaving.subtract(target)
        let result = plan(next, now: now, learnNs: learnNs, records: records)
        pendingGeneration = generation
        return result
    }

    // MARK: a rebuild (reload) that keeps the placement

    /// Takes `old`'s placement onto this one, built beside it and not attached yet (see
    /// `ServiceDataPlane.carryPlacement`): the slots that hold sockets there with their
    /// generations, the tables, failover, and the change in progress. Not carried: a starting
    /// generation's slots, and a generation change being learned (it goes on as a change within
    /// the working generation). Records are the caller's to copy.
    public mutating func carry(from old: PlacementModel, now: Int64 = 0) -> [PlacementEffect] {
        let starting = Set(old.startingGeneration?.slots ?? [])
        let carried = old.liveSlots.filter { !starting.contains($0) }
        let current: Set<UInt32> = [old.workingGeneration, old.pendingGeneration ?? old.workingGeneration]
        // Sockets first at the slots that are new here, then away from the others: a listener
        // bound with port 0 keeps its port through a socket bound to it.
        var effects: [PlacementEffect] = carried.map { slot in
            let generation = old.slotGenerations[slot].map { current.contains($0) ? workingGeneration : $0 }
            return insertSockets(slot, generation: generation ?? workingGeneration)
        }
        effects += liveSlots.filter { !carried.contains($0) }.map { closeSockets($0) }
        slots = old.slots
        buckets = old.buckets
        // Failover is carried: the flows the other slots took over while a slot was down stay
        // there. Its new worker gives the buckets back once ready, as a change that keeps them.
        failedOver = old.failedOver
        effectiveBuckets = old.effectiveBuckets
        bucketFlags = old.bucketFlags
        pending = old.pending
        if let canary = old.canary {
            // A canary is not carried (its slots are a starting generation's): its buckets go back,
            // and those a pending switch will move from there learn their flows from now.
            effectiveBuckets = withoutCanary(effectiveBuckets, named: Set(canary.slots), original: canary.original)
            pending?.canary = [:]
            if let change = pending, tracksFlows {
                let target = change.effective
                let learning = bucketFlags.indices.filter {
                    target[$0] != effectiveBuckets[$0] && bucketFlags[$0] & UInt32(RP_BUCKET_LEARN) == 0
                }
                for bucket in learning { bucketFlags[bucket] |= UInt32(RP_BUCKET_LEARN) }
                if !learning.isEmpty {
                    pending?.switchNs = max(change.switchNs, now + Int64(tracking.idleTimeoutMs) * 1_000_000)
                }
            }
        }
        leaving = old.leaving
        drainDeadlineNs = old.drainDeadlineNs
        transitionStartedNs = old.transitionStartedNs
        if transitionStartedNs != nil {
            // The change finishes with the settings it started with; this one's apply after it.
            // rp_flows is this plane's, sized by the file.
            var running = old.tracking
            running.maxFlows = tracking.maxFlows
            if running != tracking {
                deferredTracking = tracking
                tracking = running
            }
        }
        effects.append(.writeChanging(isChanging))
        effects.append(.writeBuckets(bucketValues, previous: nil))
        if let pending { effects.append(.writeNextBuckets(pending.effective)) }
        effects.append(.writeFallback(old.fallback, previous: nil))
        fallback = old.fallback
        effects += spreadFallback(over: fallbackSlots)
        return effects
    }

    // MARK: reconciling

    /// The writes that make the kernel say this placement again, whatever a failed sequence of
    /// writes left (`held`: the slots whose sockets the plane still holds). Sockets first, then
    /// every table whole, then the sockets of slots this placement does not hold: the same order
    /// as every operation.
    public func restoreEffects(held: Set<UInt32>) -> [PlacementEffect] {
        var effects = liveSlots.filter { !held.contains($0) }.map { PlacementEffect.insertSockets(slot: $0) }
        effects.append(.writeFallback(fallback, previous: nil))
        effects.append(.writeConfig(slotCount: slots.count, liveCount: fallbackSlots.count,
                                    recordCostNs: tracking.recordCostNs, changing: isChanging))
        effects.append(.writeChanging(true))
        effects.append(.writeBuckets(bucketValues, previous: nil))
        effects.append(.writeChanging(isChanging))
        if let pending { effects.append(.writeNextBuckets(pending.effective)) }
        effects += held.subtracting(slotGenerations.keys).sorted().map { PlacementEffect.closeSockets(slot: $0) }
        effects.append(.writeTransition(transitionRecord))
        return effects
    }
}

/// One kernel write of a placement operation (PlacementModel), in the order it must be made.
public enum PlacementEffect: Sendable, Equatable {
    /// Bind the slot's socket on every listener (unless it holds one) and put it in the arrays.
    case insertSockets(slot: UInt32)
    /// Take the slot's sockets out of the arrays and close them.
    case closeSockets(slot: UInt32)
    /// Take the slot's sockets out of the arrays and hand them, open, to the caller (a drain).
    case takeSockets(slot: UInt32)
    /// rp_fallback (only the entries that differ from `previous`, when given).
    case writeFallback([UInt32], previous: [UInt32]?)
    /// rp_config's slot count, live count, the cost of a record (the tracking settings in force)
    /// and whether a change runs (RP_CONFIG_CHANGING); seed, bucket count and the QUIC layout are
    /// the plane's.
    case writeConfig(slotCount: Int, liveCount: Int, recordCostNs: UInt32, changing: Bool)
    /// RP_CONFIG_CHANGING alone, the rest of rp_config as it is.
    case writeChanging(Bool)
    /// rp_buckets' values, slot and flags (only the entries that differ from `previous`).
    case writeBuckets([UInt32], previous: [UInt32]?)
    /// rp_next_buckets: the table the pending switch writes.
    case writeNextBuckets([UInt32])
    /// rp_transition.
    case writeTransition(rp_transition)
    /// Every record in rp_flows goes.
    case clearRecords
    /// Every marker in rp_untracked goes.
    case clearUntrackedMarkers
}

extension rp_transition: @retroactive Equatable {
    public static func == (a: rp_transition, b: rp_transition) -> Bool {
        withUnsafeBytes(of: a) { a in withUnsafeBytes(of: b) { b in a.elementsEqual(b) } }
    }
}
