import CReuseportABI
import Testing

@testable import ReuseportKit

/// A canary on the placement model, in process: the exact share of buckets, promotion that moves
/// the fewest, a rollback that gives back exactly the canary's buckets, and what is refused.
/// PlacementModelTests drives the same operations in random sequences against a simulated kernel.
struct CanaryPlacementTests {
    static let learnNs: Int64 = 3_000_000_000

    /// 4 slots of generation 1, generation 2 starting on 4 more, a canary of `percent` switched.
    static func canary(_ percent: Int, buckets: Int = 4096) throws -> PlacementModel {
        var model = try PlacementModel(bucketCount: buckets, slotCount: 4,
                                       tracking: .init(idleTimeoutMs: 3000, drainTimeoutMs: 0), hasUDP: true)
        _ = try model.startGeneration(count: 4)
        let (plan, _) = try model.startCanary(percent: percent, now: 0)
        #expect(plan.movingBuckets == CanaryPlacement.share(percent: percent, of: buckets))
        #expect(plan.leaving.isEmpty, "no slot leaves at a canary's switch")
        #expect(model.advance(now: learnNs) != nil)
        #expect(model.violations().isEmpty, "\(model.violations())")
        return model
    }

    @Test(arguments: [1, 10, 33, 50, 99])
    func theShareIsExactInTheBucketTable(percent: Int) throws {
        let model = try Self.canary(percent)
        let onCanary = model.effectiveBuckets.filter { (4..<8).contains($0) }.count
        #expect(onCanary == (4096 * percent + 50) / 100)
        // Each slot of either generation gives or takes its part, within one bucket of the others'.
        var held: [UInt32: Int] = [:]
        for slot in model.effectiveBuckets { held[slot, default: 0] += 1 }
        for generation in [Array(UInt32(0)..<4), Array(UInt32(4)..<8)] {
            let counts = generation.map { held[$0] ?? 0 }
            #expect(counts.max()! - counts.min()! <= 1, "\(counts)")
        }
    }

    /// What the program does with that table: of 100,000 flows' hashes, the canary's share.
    @Test func tenPercentOfTheBucketsTakeTenPercentOfTheFlows() throws {
        let model = try Self.canary(10)
        let snapshot = SteeringSnapshot(seed: 0x5eed, slotCount: 4, buckets: model.bucketValues,
                                        liveSlots: Set(model.liveSlots))
        var random = SystemRandomNumberGenerator()
        let flows = 100_000
        let onCanary = (0..<flows).filter { _ in
            let flow = FlowTuple(.udp, from: SocketAddress(IPAddress(bytes: [10, 0, UInt8.random(in: 0...255, using: &random),
                                                                             UInt8.random(in: 0...255, using: &random)])!,
                                                           UInt16.random(in: 1024...65535, using: &random)),
                                 to: SocketAddress(.loopbackV4, 53))
            return snapshot.placement(of: flow).slot.map { $0 >= 4 } == true
        }.count
        #expect(abs(Double(onCanary) / Double(flows) - 0.10) <= 0.01, "\(onCanary) of \(flows)")
    }

    /// Promotion moves only the buckets the canary does not hold: 4096 − 410.
    @Test func promotionMovesTheFewest() throws {
        var model = try Self.canary(10)
        let (plan, _) = try model.switchGeneration(now: 2 * Self.learnNs)
        #expect(plan.movingBuckets == 4096 - 410)
        #expect(plan.leaving == [0, 1, 2, 3])
        #expect(model.canary == nil && model.startingGeneration == nil && model.pendingGeneration == 2)
        _ = model.advance(now: 3 * Self.learnNs)
        #expect(model.workingGeneration == 2 && model.slots == [4, 5, 6, 7])
        #expect(model.violations().isEmpty, "\(model.violations())")
    }

    /// A rollback gives back exactly the canary's buckets, each to the slot it had; the canary's
    /// slots leave, and retire only once no table names them.
    @Test func aRollbackGivesBackExactlyTheCanarysBuckets() throws {
        let before = try PlacementModel(bucketCount: 4096, slotCount: 4,
                                        tracking: .init(idleTimeoutMs: 3000, drainTimeoutMs: 0), hasUDP: true)
        var model = try Self.canary(10)
        let (plan, _) = try model.rollBackCanary(now: 2 * Self.learnNs)
        #expect(plan.movingBuckets == 410 && plan.leaving == [4, 5, 6, 7])
        #expect(model.leaving == [4, 5, 6, 7] && model.canary == nil && model.startingGeneration == nil)
        #expect(model.slotsToRetire(liveBySlot: [:], now: 2 * Self.learnNs).isEmpty,
                "a slot the table still names does not retire")
        #expect(throws: ReuseportError.self) { try model.retire(4) }
        _ = model.advance(now: 3 * Self.learnNs)
        #expect(model.effectiveBuckets == before.effectiveBuckets)
        #expect(model.slotsToRetire(liveBySlot: [:], now: 3 * Self.learnNs) == [4, 5, 6, 7])
        #expect(model.violations().isEmpty, "\(model.violations())")
    }

    @Test func whatACanaryRefuses() throws {
        var fresh = try PlacementModel(bucketCount: 64, slotCount: 2, tracking: .init(), hasUDP: true)
        #expect(throws: ReuseportError.invalidArgument("no generation is starting: a canary is a starting generation's")) {
            try fresh.startCanary(percent: 10, now: 0)
        }
        _ = try fresh.startGeneration(count: 2)
        for percent in [0, 100] {
            #expect(throws: ReuseportError.invalidArgument("a canary takes 1 to 99 percent of the buckets, not \(percent)")) {
                try fresh.startCanary(percent: percent, now: 0)
            }
        }
        var model = try Self.canary(10)
        #expect(throws: ReuseportError.invalidArgument(
            "generation 2 is a canary: promote it or roll it back before you scale")) {
            try model.beginResize(to: 5, now: 0)
        }
        #expect(model.abandonGeneration().isEmpty, "a canary that takes flows is rolled back, not abandoned")
        var learning = try PlacementModel(bucketCount: 64, slotCount: 2, tracking: .init(), hasUDP: true)
        _ = try learning.startGeneration(count: 2)
        _ = try learning.startCanary(percent: 10, now: 0)
        #expect(throws: ReuseportError.self) { try learning.switchGeneration(now: 0) }
    }
}
