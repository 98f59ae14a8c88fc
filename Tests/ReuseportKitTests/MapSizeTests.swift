import CReuseportABI
import ReuseportTestTraits
import Testing

@testable import ReuseportKit

/// The rules that size a service's maps from its configuration (ReuseportKit/Limits.swift): pure,
/// without root. What the kernel then charges is SteeringTests' (a real service of 4 workers).
@Suite(.onTestThreads) struct MapSizeTests {
    /// 4 slots per worker, a power of two of at least 16, at most RP_MAX_SLOTS.
    @Test func theSlotCapacityIsAPowerOfTwoWithRoomForGenerations() throws {
        let expected = [1: 16, 4: 16, 5: 32, 8: 32, 9: 64, 100: 512, 256: 1024, 257: 1024, 1024: 1024]
        for (workers, capacity) in expected {
            #expect(SlotCapacity.sized(workers: workers).value == capacity, "\(workers) workers")
        }
        for workers in 1...Int(RP_MAX_SLOTS) {
            let capacity = SlotCapacity.sized(workers: workers).value
            #expect(capacity & (capacity - 1) == 0 && capacity <= Int(RP_MAX_SLOTS))
            #expect(capacity >= min(Int(RP_MAX_SLOTS), Int(RP_SLOTS_PER_WORKER) * workers))
        }
    }

    /// 8,192 records per worker up to today's default, rp_untracked a quarter (at least 1,024);
    /// a configured count is the configuration's.
    @Test func theFlowTablesAreSizedFromTheWorkers() throws {
        #expect(TrackedFlowCount.sized(workers: 4).value == 32_768)
        #expect(TrackedFlowCount.sized(workers: 4).untrackedMarkers == 8_192)
        #expect(TrackedFlowCount.sized(workers: 32).value == Int(RP_DEFAULT_TRACKED_FLOWS))
        #expect(TrackedFlowCount.sized(workers: 1024).value == Int(RP_DEFAULT_TRACKED_FLOWS))
        #expect(try TrackedFlowCount(100).untrackedMarkers == Int(RP_MIN_UNTRACKED_MARKERS))
        #expect(try TrackedFlowCount(Int(RP_MAX_TRACKED_FLOWS)).untrackedMarkers == Int(RP_MAX_TRACKED_FLOWS) / 4)
    }
}
