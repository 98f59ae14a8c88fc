import CReuseportABI

/// A canary: a starting generation that takes the new flows of a share of the buckets while it
/// bakes, beside the working generation, which keeps the rest and every live flow.
///
/// The share is exact in the bucket table: `buckets.count` of `bucketCount` buckets, each
/// pointing at the slot promotion will give it (`promoted`, the table `switchGeneration` writes),
/// so that promotion moves only the buckets the canary does not hold already: the fewest any
/// promotion can move. Starting it, promoting it and rolling it back are placement changes that
/// keep every live flow (the buckets that move learn their flows first, then switch, pinned).
public struct CanaryPlacement: Sendable, Equatable {
    public var generation: UInt32
    public var slots: [UInt32]
    /// The buckets whose new flows go to the canary, ascending.
    public var buckets: [Int]
    /// Where promotion puts every bucket: the nominal table rebalanced onto the canary's slots.
    public var promoted: [UInt32]
    /// The slot each canary bucket named before the canary (a rebuild puts it back).
    public var original: [Int: UInt32]
    /// The canary's buckets point at its slots (its change switched); false while they learn.
    public var switched = false

    /// Bucket → canary slot.
    public var assignment: [Int: UInt32] { Dictionary(uniqueKeysWithValues: buckets.map { ($0, promoted[$0]) }) }

    /// `percent` of `count` buckets, rounded to the nearest (at least 1, at most all but 1).
    public static func share(percent: Int, of count: Int) -> Int {
        min(max((count * percent + 50) / 100, 1), max(count - 1, 1))
    }

    /// `share` buckets of `table` (where each bucket points now) for the canary, whose slots get
    /// them as `promoted` says: each slot of the working generation gives, and each canary slot
    /// takes, its part of them within one bucket.
    public static func choose(_ share: Int, of table: [UInt32], promoted: [UInt32]) -> [Int] {
        var held: [UInt32: Int] = [:]
        for slot in table { held[slot, default: 0] += 1 }
        let canarySlots = Set(promoted).count
        var gives: [UInt32: Int] = [:]
        var takes: [UInt32: Int] = [:]
        var chosen: Set<Int> = []
        // First each slot's whole part (rounded down), then at most one more each.
        for extra in [0, 1] {
            for bucket in table.indices where chosen.count < share && !chosen.contains(bucket) {
                let from = table[bucket], to = promoted[bucket]
                guard gives[from, default: 0] < share * held[from]! / table.count + extra,
                      takes[to, default: 0] < share / canarySlots + extra else { continue }
                gives[from, default: 0] += 1
                takes[to, default: 0] += 1
                chosen.insert(bucket)
            }
        }
        // Whatever the bounds left out (they need not add up exactly), in table order.
        for bucket in table.indices where chosen.count < share { chosen.insert(bucket) }
        return chosen.sorted()
    }

    public static let percentRange = 1...99
}

extension PlacementModel {
    func refuseDuringCanary(_ what: String) throws {
        if let canary {
            throw ReuseportError.invalidArgument("generation \(canary.generation) is a canary: promote it or roll it "
                + "back before you \(what)")
        }
    }

    /// `table` (the nominal table laid over the set) with the buckets rp_buckets sends outside
    /// the set kept where they are: a switched canary's, those a promotion being learned found at
    /// their new slots already, and a rolled-back canary's until its switch. The nominal table
    /// does not hold them, and moving them would move their live flows. `except`: a slot whose
    /// buckets do go (it fails over).
    func keepingOutsideSet(_ table: [UInt32], except: UInt32?) -> [UInt32] {
        let set = Set(slots)
        var table = table
        for bucket in table.indices {
            let slot = effectiveBuckets[bucket]
            if !set.contains(slot), slot != except { table[bucket] = slot }
        }
        return table
    }

    /// Sends the new flows of `percent` % of the buckets to the starting generation, whose
    /// workers are all ready, as a change: those buckets learn their live flows for `learnNs`
    /// (default one idle timeout), then switch, their recorded flows kept on the working
    /// generation until idle. The other buckets do not move. The generation stays the starting
    /// one: `switchGeneration` promotes it, `rollBackCanary` takes its buckets back.
    public mutating func startCanary(percent: Int, now: Int64, learnNs: Int64? = nil, records: [UInt32: Int] = [:])
        throws -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        guard CanaryPlacement.percentRange.contains(percent) else {
            throw ReuseportError.invalidArgument("a canary takes 1 to 99 percent of the buckets, not \(percent)")
        }
        guard let starting = startingGeneration else {
            throw ReuseportError.invalidArgument("no generation is starting: a canary is a starting generation's")
        }
        guard canary == nil else {
            throw ReuseportError.invalidArgument("generation \(starting.generation) is a canary already")
        }
        guard pending == nil else {
            throw ReuseportError.invalidArgument("a placement change is learning its live flows: start the canary "
                + "once it switched")
        }
        let promoted = BucketAssignment.rebalance(buckets, to: starting.slots)
        let chosen = CanaryPlacement.choose(CanaryPlacement.share(percent: percent, of: bucketCount),
                                            of: effectiveBuckets, promoted: promoted)
        let started = CanaryPlacement(generation: starting.generation, slots: starting.slots, buckets: chosen,
                                      promoted: promoted,
                                      original: Dictionary(uniqueKeysWithValues: chosen.map { ($0, effectiveBuckets[$0]) }))
        canary = started
        let next = PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now,
                                    canary: started.assignment)
        return plan(next, now: now, learnNs: learnNs, records: records)
    }

    /// Gives a canary's buckets back to the working generation, as a change: they learn the
    /// canary's live flows, then switch back; the canary's slots leave at once (no new flow is
    /// placed on them after the switch) and retire once their recorded flows are idle, or at
    /// the drain timeout. Its generation is no longer starting: it drains as a rolled-back one.
    public mutating func rollBackCanary(now: Int64, learnNs: Int64? = nil, records: [UInt32: Int] = [:])
        throws -> (plan: TransitionPlan, effects: [PlacementEffect])
    {
        guard let rolled = canary else {
            throw ReuseportError.invalidArgument("no canary to roll back")
        }
        var next = pending ?? PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now)
        next.canary = [:]
        canary = nil
        startingGeneration = nil
        // Its slots take no role in the set: they leave (retire waits until no table names them).
        leaving.formUnion(rolled.slots)
        return plan(next, now: now, learnNs: learnNs, records: records)
    }

    /// The table a rebuild (or a daemon started on the pins) carries when a canary ran: its
    /// buckets back at the slots they named before it, or, where that slot no longer takes
    /// flows, spread over those that do.
    func withoutCanary(_ table: [UInt32], named canarySlots: Set<UInt32>, original: [Int: UInt32]) -> [UInt32] {
        var table = table
        // With every slot of the set failed over, the set itself: its sockets are still there.
        let live = slots.filter { !failedOver.contains($0) }
        let takers = live.isEmpty ? slots : live
        for bucket in table.indices where canarySlots.contains(table[bucket]) {
            if let slot = original[bucket], takers.contains(slot) { table[bucket] = slot }
        }
        return table.contains(where: { canarySlots.contains($0) }) ? BucketAssignment.rebalance(table, to: takers) : table
    }
}
