#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportTestSupport
import Testing

@testable import ReuseportKit

/// A canary as the records keep it (rp_canary, rp_canary_buckets), in process: the encoding read
/// back the same, records that contradict themselves read as no canary, and a placement read
/// back from its pins with its canary record is the same placement, canary included; pins that
/// disagree with the record resume none (its slots leave, as before records version 3).
struct CanaryRecordTests {
    static func record(of model: PlacementModel, phase: PinnedCanary.Phase? = nil) -> PinnedCanary {
        let canary = model.canary!
        return PinnedCanary(phase: phase ?? (canary.switched ? .baking : .learning), generation: canary.generation,
                            previous: model.workingGeneration, percent: 10, bakeMs: 20_000,
                            bakeEndsNs: canary.switched ? 123_000_000_000 : nil,
                            bakeEndsWallNs: canary.switched ? 1_765_000_000_000_000_000 : nil, gated: true,
                            counted: (.init(quickExits: 1, crashes: 2, watchdogMisses: 3, stalls: 4, healthFailures: 5,
                                            packets: 6_000_000_000, drops: 7),
                                      .init(healthFailures: 1, packets: 9, drops: 0)),
                            original: canary.original)
    }

    @Test(arguments: [PinnedCanary.Phase.learning, .baking, .gate])
    func theEncodingReadsBackTheSame(phase: PinnedCanary.Phase) throws {
        let model = try CanaryPlacementTests.canary(10)
        var record = Self.record(of: model, phase: phase)
        if phase == .learning { (record.bakeEndsNs, record.bakeEndsWallNs) = (nil, nil) }
        let value = record.value
        #expect(value.phase == phase.rawValue && value.buckets == 410 && value.flags == RP_CANARY_GATED)
        let table = record.bucketValues(bucketCount: 4096)
        #expect(table.filter { $0 != RP_CANARY_NOT_A_BUCKET }.count == 410)
        #expect(PinnedCanary(value: value, buckets: table) == record)
    }

    /// No canary (phase 0, the zeroed entry of a new map), an unknown phase, a bucket count that
    /// is not the table's, a learning canary with a bake end: no canary, rather than a wrong one.
    @Test func recordsThatContradictThemselvesAreNoCanary() throws {
        let model = try CanaryPlacementTests.canary(10)
        let record = Self.record(of: model)
        let table = record.bucketValues(bucketCount: 4096)
        #expect(PinnedCanary(value: rp_canary(), buckets: table) == nil)
        var value = record.value
        value.phase = 9
        #expect(PinnedCanary(value: value, buckets: table) == nil)
        value = record.value
        value.buckets = 409
        #expect(PinnedCanary(value: value, buckets: table) == nil)
        value = record.value
        value.phase = RP_CANARY_LEARNING.rawValue
        #expect(PinnedCanary(value: value, buckets: table) == nil)
        #expect(PinnedCanary(value: record.value, buckets: Array(repeating: RP_CANARY_NOT_A_BUCKET, count: 4096)) == nil)
    }

    /// A switched canary (it bakes) and one whose buckets learn: read back from the pins with its
    /// record, the placement has the same canary, tables, set and starting generation, and the
    /// operations that end a canary (promotion, rollback) work on it as on the original.
    @Test(arguments: [true, false])
    func aPlacementWithItsCanaryRecordIsResumedWithTheCanary(switched: Bool) throws {
        var model = try PlacementModel(bucketCount: 4096, slotCount: 4,
                                       tracking: .init(idleTimeoutMs: 3000, drainTimeoutMs: 0), hasUDP: true)
        _ = try model.startGeneration(count: 4)
        _ = try model.startCanary(percent: 25, now: 0)
        if switched { #expect(model.advance(now: CanaryPlacementTests.learnNs) != nil) }
        var image = model.pinnedImage()
        image.canary = Self.record(of: model)
        let resumed = try PlacementModel(resuming: image, tracking: model.tracking, hasUDP: true,
                                         now: CanaryPlacementTests.learnNs)
        #expect(resumed.canary == model.canary)
        #expect(resumed.startingGeneration == model.startingGeneration)
        #expect(resumed.buckets == model.buckets && resumed.effectiveBuckets == model.effectiveBuckets)
        #expect(resumed.pending == model.pending && resumed.slots == model.slots)
        #expect(resumed.leaving.isEmpty, "no slot leaves: \(resumed.leaving)")
        #expect(!resumed.isStarved, "the canary's buckets are not taken back")
        #expect(resumed.violations().isEmpty, "\(resumed.violations())")
        if switched {
            let now = 2 * CanaryPlacementTests.learnNs
            var promoted = resumed, original = model
            let promotion = try promoted.switchGeneration(now: now).plan
            #expect(promotion == (try original.switchGeneration(now: now).plan))
            var rolled = resumed
            original = model
            let rollback = try rolled.rollBackCanary(now: now).plan
            #expect(rollback == (try original.rollBackCanary(now: now).plan))
        }
        // Without the record, as before records version 3: the canary's slots leave, and its
        // buckets (switched) are starved slots' buckets, given back as a change.
        image.canary = nil
        let without = try PlacementModel(resuming: image, tracking: model.tracking, hasUDP: true,
                                         now: CanaryPlacementTests.learnNs)
        #expect(without.canary == nil && without.startingGeneration == nil)
        #expect(without.leaving == Set(model.canary!.slots))
    }

    /// A record the pins do not bear out (its buckets do not name the canary's slots, or its
    /// generation has no slot) resumes no canary.
    @Test func aRecordThePinsContradictResumesNoCanary() throws {
        let model = try CanaryPlacementTests.canary(10)
        var image = model.pinnedImage()
        var record = Self.record(of: model)
        let bucket = record.original.keys.min()!
        record.original.removeValue(forKey: bucket)
        record.original[(0..<4096).first { record.original[$0] == nil && $0 != bucket }!] = 0
        image.canary = record
        #expect(try PlacementModel(resuming: image, tracking: model.tracking, hasUDP: true, now: 0).canary == nil)
        record = Self.record(of: model)
        record.generation = 7
        image.canary = record
        #expect(try PlacementModel(resuming: image, tracking: model.tracking, hasUDP: true, now: 0).canary == nil)
    }

    /// The maps themselves: pinned, written and read back by another opener as a later daemon
    /// reads them; "no canary" once it ended; none at all where pins of version 2 have no maps.
    @Test(.enabled(if: isRoot, "creates and pins BPF maps: needs root"))
    func thePinnedMapsSayWhatWasPublished() throws {
        let model = try CanaryPlacementTests.canary(10)
        let record = Self.record(of: model)
        let layout = PinLayout(root: "/sys/fs/bpf/reuseportd-test-\(getpid())-canary", service: "c")
        try layout.create(listeners: 0)
        defer { layout.remove() }
        #expect(try CanaryRecords.pinned(at: layout, bucketCount: 4096) == nil, "no maps: no canary")
        let maps = try CanaryRecords(bucketCount: 4096)
        try maps.pin(at: layout)
        #expect(try CanaryRecords.pinned(at: layout, bucketCount: 4096) == nil, "new maps say none")
        try maps.publish(record)
        #expect(try CanaryRecords.pinned(at: layout, bucketCount: 4096) == record)
        #expect(try CanaryRecords.pinned(at: layout, bucketCount: 1024) == nil, "another bucket count: none")
        try maps.publish(nil)
        #expect(try CanaryRecords.pinned(at: layout, bucketCount: 4096) == nil)
        layout.remove()
        #expect(!layout.exists, "removing the pins removes the canary's too")
    }
}
