import PropertyBased
import ReuseportKit
import ReuseportTestTraits
import Testing

/// The bucket table under random sequences of slot sets and failovers, in process and without
/// root: the placement every change (scale, upgrade, rollback, failover, restore) writes comes
/// from `BucketAssignment`, so what holds for any sequence here holds for the tables the daemon
/// writes. Each sequence is a list of 16-bit masks (bit i: slot i is in the set; a second mask
/// picks the failed-over slots); a failing one shrinks to the shortest list with the smallest masks.
@Suite(.onTestThreads) struct PlacementPropertyTests {
    static func slots(_ mask: UInt16) -> [UInt32] { (0..<16).filter { mask & (1 << $0) != 0 }.map(UInt32.init) }

    static func counts(_ table: [UInt32]) -> [UInt32: Int] {
        table.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }

    /// Every slot of the set holds ⌊B/N⌋ or ⌈B/N⌉ buckets, and no other slot any.
    static func balanced(_ table: [UInt32], over slots: [UInt32]) -> String? {
        let quota = table.count / slots.count
        let counts = counts(table)
        if let stranger = counts.keys.first(where: { !slots.contains($0) }) { return "slot \(stranger) is not in \(slots)" }
        for slot in slots where !(quota...quota + (table.count % slots.count == 0 ? 0 : 1)).contains(counts[slot] ?? 0) {
            return "slot \(slot) holds \(counts[slot] ?? 0) of \(table.count) buckets over \(slots.count) slots"
        }
        return nil
    }

    /// Rebalancing keeps, on every slot that stays, at least min(what it held, ⌊B/N⌋) of its
    /// buckets where they were: nothing moves that need not.
    static func keptEnough(from old: [UInt32], to new: [UInt32], over slots: [UInt32]) -> String? {
        let quota = new.count / slots.count
        let before = counts(old)
        var stayed: [UInt32: Int] = [:]
        for (was, now) in zip(old, new) where was == now { stayed[was, default: 0] += 1 }
        for slot in slots where before[slot] != nil && (stayed[slot] ?? 0) < min(before[slot]!, quota) {
            return "slot \(slot) kept \(stayed[slot] ?? 0) of its \(before[slot]!) buckets (quota \(quota))"
        }
        return nil
    }

    /// 500 sequences of up to 24 slot sets over 64, 1024 or 4096 buckets: after every step the
    /// table is balanced over the set and kept what it could.
    @Test func everySequenceOfSlotSetsStaysBalancedAndMovesTheLeast() async {
        await propertyCheck(count: 500, input: Gen.element(of: [64, 1024, 4096]),
                            Gen.uint16(in: 1...UInt16.max).array(of: 1...24)) { buckets, masks in
            var table = BucketAssignment.initial(bucketCount: buckets ?? 64, slots: Self.slots(masks[0]))
            for (step, mask) in masks.enumerated() {
                let set = Self.slots(mask)
                let next = BucketAssignment.rebalance(table, to: set)
                let unbalanced = Self.balanced(next, over: set)
                let moved = Self.keptEnough(from: table, to: next, over: set)
                #expect(unbalanced == nil, "step \(step), \(set): \(unbalanced ?? "")")
                #expect(moved == nil, "step \(step), \(set): \(moved ?? "")")
                table = next
            }
        }
    }

    /// 500 sequences of (set, failed) pairs: the overlay never names a failed slot, moves only
    /// the failed slots' buckets, spreads them over the live ones evenly (each live slot within
    /// one bucket of the others), and with nothing failed is the nominal table itself.
    @Test func failoverMovesOnlyTheFailedSlotsBucketsAndRestoresExactly() async {
        await propertyCheck(count: 500, input: Gen.uint16(in: 1...UInt16.max).array(of: 1...12),
                            Gen.uint16(in: 0...UInt16.max).array(of: 12)) { masks, failedMasks in
            var nominal = BucketAssignment.initial(bucketCount: 1024, slots: Self.slots(masks[0]))
            for (step, mask) in masks.enumerated() {
                let set = Self.slots(mask)
                nominal = BucketAssignment.rebalance(nominal, to: set)
                let failed = Set(Self.slots(failedMasks[step] & mask))
                let effective = BucketAssignment.overlay(nominal, slots: set, failed: failed)
                #expect(BucketAssignment.overlay(nominal, slots: set, failed: []) == nominal, "step \(step): restore")
                guard failed.count < set.count else {
                    #expect(effective == nominal, "step \(step): every slot failed leaves the table as it is")
                    continue
                }
                let live = set.filter { !failed.contains($0) }
                let named = Self.counts(effective)
                #expect(failed.allSatisfy { named[$0] == nil }, "step \(step): a failed slot keeps buckets: \(failed)")
                #expect(zip(nominal, effective).allSatisfy { failed.contains($0) || $0 == $1 },
                        "step \(step): a bucket of a live slot moved")
                let spread = live.map { named[$0] ?? 0 }
                #expect(spread.max()! - spread.min()! <= 1, "step \(step): live slots hold \(spread) over \(live)")
            }
        }
    }
}
