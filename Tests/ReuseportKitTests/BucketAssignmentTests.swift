import ReuseportTestTraits
import Testing
@testable import ReuseportKit

@Suite(.onTestThreads) struct BucketAssignmentTests {
    func counts(_ table: [UInt32]) -> [UInt32: Int] {
        table.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }

    func expectBalanced(_ table: [UInt32], slots: [UInt32]) {
        let c = counts(table)
        #expect(Set(c.keys) == Set(slots))
        let low = table.count / slots.count
        let high = (table.count + slots.count - 1) / slots.count
        for slot in slots { #expect((low...high).contains(c[slot] ?? 0), "slot \(slot): \(c[slot] ?? 0)") }
    }

    @Test(arguments: [1, 2, 3, 4, 7, 8, 15, 16, 100])
    func growingByOneMovesTheMinimum(n: Int) {
        let b = 4096
        let old = BucketAssignment.initial(bucketCount: b, slots: (0..<UInt32(n)).map { $0 })
        let new = BucketAssignment.rebalance(old, to: (0...UInt32(n)).map { $0 })
        expectBalanced(new, slots: (0...UInt32(n)).map { $0 })
        // The new slot must receive ⌊B/(N+1)⌋ buckets at least; nothing else moves.
        let moved = BucketAssignment.moved(from: old, to: new)
        #expect(moved == counts(new)[UInt32(n)]!)
        #expect(Double(moved) <= Double(b) / Double(n + 1) + 1)
    }

    @Test func shrinkingMovesOnlyTheRemovedSlotsBuckets() {
        let old = BucketAssignment.initial(bucketCount: 4096, slots: [0, 1, 2, 3, 4, 5])
        let new = BucketAssignment.rebalance(old, to: [0, 1, 2])
        expectBalanced(new, slots: [0, 1, 2])
        for (o, n) in zip(old, new) where o < 3 { #expect(o == n) }
    }

    @Test func failingOverAndBackRestoresBalance() {
        let old = BucketAssignment.initial(bucketCount: 1000, slots: [0, 1, 2, 3])
        let failed = BucketAssignment.rebalance(old, to: [0, 1, 3])
        for (o, f) in zip(old, failed) where o != 2 { #expect(o == f) }
        let back = BucketAssignment.rebalance(failed, to: [0, 1, 2, 3])
        expectBalanced(back, slots: [0, 1, 2, 3])
        #expect(BucketAssignment.moved(from: failed, to: back) == 250)
    }

    @Test func sequenceFourSixThree() {
        var table = BucketAssignment.initial(bucketCount: 4096, slots: [0, 1, 2, 3])
        for n in [6, 3, 5, 1, 8] {
            let next = BucketAssignment.rebalance(table, to: (0..<UInt32(n)).map { $0 })
            expectBalanced(next, slots: (0..<UInt32(n)).map { $0 })
            table = next
        }
    }
}
