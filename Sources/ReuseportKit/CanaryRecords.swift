#if canImport(Glibc)
import Glibc
#endif
import CLibbpf

/// A canary as the daemon pins it for a later daemon (bpf/records.h: rp_canary and
/// rp_canary_buckets): the bake (phase, generations, percent, when it ends, what it counted, the
/// gate) and the slot each canary bucket named before it. A value, encoded and decoded purely
/// (`value`, `init(value:original:)`), so that what is pinned is derived from the daemon's state
/// and read back the same (CanaryRecordTests).
public struct PinnedCanary: Equatable, Sendable {
    public enum Phase: UInt32, Sendable {
        case learning = 1, baking = 2, gate = 3
    }

    /// What the bake counted for one generation (rp_bake_events).
    public struct Counted: Equatable, Sendable {
        public var quickExits = 0, crashes = 0, watchdogMisses = 0, stalls = 0, healthFailures = 0
        public var packets = 0, drops = 0

        public init(quickExits: Int = 0, crashes: Int = 0, watchdogMisses: Int = 0, stalls: Int = 0,
                    healthFailures: Int = 0, packets: Int = 0, drops: Int = 0) {
            self.quickExits = quickExits
            self.crashes = crashes
            self.watchdogMisses = watchdogMisses
            self.stalls = stalls
            self.healthFailures = healthFailures
            self.packets = packets
            self.drops = drops
        }

        var value: rp_bake_events {
            func u32(_ n: Int) -> UInt32 { UInt32(clamping: max(n, 0)) }
            return rp_bake_events(quick_exits: u32(quickExits), crashes: u32(crashes),
                                  watchdog_misses: u32(watchdogMisses), stalls: u32(stalls),
                                  health_failures: u32(healthFailures), pad: 0,
                                  packets: UInt64(max(packets, 0)), drops: UInt64(max(drops, 0)))
        }

        init(_ value: rp_bake_events) {
            self.init(quickExits: Int(value.quick_exits), crashes: Int(value.crashes),
                      watchdogMisses: Int(value.watchdog_misses), stalls: Int(value.stalls),
                      healthFailures: Int(value.health_failures), packets: Int(clamping: value.packets),
                      drops: Int(clamping: value.drops))
        }
    }

    public var phase: Phase
    public var generation: UInt32
    public var previous: UInt32
    public var percent: Int
    public var bakeMs: Int
    /// CLOCK_MONOTONIC; nil before the bake began.
    public var bakeEndsNs: Int64?
    /// CLOCK_REALTIME, for reuseportctl; nil before the bake began.
    public var bakeEndsWallNs: UInt64?
    public var gated: Bool
    /// The canary's, then the working generation's.
    public var counted: (canary: Counted, working: Counted)
    /// Bucket → the slot it named before the canary: the canary's buckets.
    public var original: [Int: UInt32]

    public init(phase: Phase, generation: UInt32, previous: UInt32, percent: Int, bakeMs: Int, bakeEndsNs: Int64?,
                bakeEndsWallNs: UInt64?, gated: Bool, counted: (canary: Counted, working: Counted),
                original: [Int: UInt32]) {
        self.phase = phase
        self.generation = generation
        self.previous = previous
        self.percent = percent
        self.bakeMs = bakeMs
        self.bakeEndsNs = bakeEndsNs
        self.bakeEndsWallNs = bakeEndsWallNs
        self.gated = gated
        self.counted = counted
        self.original = original
    }

    public static func == (a: PinnedCanary, b: PinnedCanary) -> Bool {
        a.phase == b.phase && a.generation == b.generation && a.previous == b.previous && a.percent == b.percent
            && a.bakeMs == b.bakeMs && a.bakeEndsNs == b.bakeEndsNs && a.bakeEndsWallNs == b.bakeEndsWallNs
            && a.gated == b.gated && a.counted.canary == b.counted.canary && a.counted.working == b.counted.working
            && a.original == b.original
    }

    /// rp_canary's entry.
    public var value: rp_canary {
        var value = rp_canary()
        value.phase = phase.rawValue
        value.generation = generation
        value.previous = previous
        value.percent = UInt32(clamping: percent)
        value.buckets = UInt32(original.count)
        value.flags = gated ? UInt32(RP_CANARY_GATED) : 0
        value.bake_ms = UInt64(max(bakeMs, 0))
        value.bake_ends_ns = bakeEndsNs.map { UInt64(max($0, 0)) } ?? 0
        value.bake_ends_wall_ns = bakeEndsWallNs ?? 0
        value.counted = (counted.canary.value, counted.working.value)
        return value
    }

    /// rp_canary_buckets' values, `bucketCount` of them.
    public func bucketValues(bucketCount: Int) -> [UInt32] {
        (0..<bucketCount).map { original[$0] ?? RP_CANARY_NOT_A_BUCKET }
    }

    /// The canary `value` and `buckets` (rp_canary_buckets) say; nil for no canary (phase
    /// RP_CANARY_NONE), and for records that contradict themselves (an unknown phase, a bucket
    /// count that is not the table's): a daemon resumes no canary rather than a wrong one.
    public init?(value: rp_canary, buckets: [UInt32]) {
        guard let phase = Phase(rawValue: value.phase) else { return nil }
        var original: [Int: UInt32] = [:]
        for (bucket, slot) in buckets.enumerated() where slot != RP_CANARY_NOT_A_BUCKET { original[bucket] = slot }
        guard !original.isEmpty, original.count == Int(value.buckets), value.generation != 0,
              value.generation != value.previous, phase != .learning || value.bake_ends_ns == 0
        else { return nil }
        self.init(phase: phase, generation: value.generation, previous: value.previous, percent: Int(value.percent),
                  bakeMs: Int(clamping: value.bake_ms),
                  bakeEndsNs: value.bake_ends_ns == 0 ? nil : Int64(clamping: value.bake_ends_ns),
                  bakeEndsWallNs: value.bake_ends_wall_ns == 0 ? nil : value.bake_ends_wall_ns,
                  gated: value.flags & UInt32(RP_CANARY_GATED) != 0,
                  counted: (Counted(value.counted.0), Counted(value.counted.1)), original: original)
    }
}

/// One service's rp_canary and rp_canary_buckets (bpf/records.h), pinned beside its other
/// records. The daemon is their only writer (`publish`, from its bake and the placement's
/// canary, at each step and each check of the bake); a later daemon reads them once (`pinned`).
/// Pins without them (records of version 2 or 1) had no canary recorded.
public final class CanaryRecords: @unchecked Sendable {
    let canary: BPFMap
    let buckets: BPFMap
    let bucketCount: Int
    /// What the maps hold, as this process last wrote them.
    private var written: PinnedCanary?
    private var writtenAny = false

    public static let names = [RP_MAP_CANARY, RP_MAP_CANARY_BUCKETS]

    /// New maps for a service of `bucketCount` buckets, saying "no canary".
    public init(bucketCount: Int) throws {
        self.bucketCount = try BucketCount(bucketCount).value
        canary = try BPFMap(creating: BPF_MAP_TYPE_ARRAY, name: RP_MAP_CANARY, keySize: MemoryLayout<UInt32>.size,
                            valueSize: MemoryLayout<rp_canary>.size, maxEntries: 1)
        buckets = try BPFMap(creating: BPF_MAP_TYPE_ARRAY, name: RP_MAP_CANARY_BUCKETS,
                             keySize: MemoryLayout<UInt32>.size, valueSize: MemoryLayout<UInt32>.size,
                             maxEntries: UInt32(self.bucketCount))
    }

    /// The canary a previous daemon pinned at `layout` for a service of `bucketCount` buckets;
    /// nil when none is pinned (or the maps are not there: records of an earlier version).
    /// Throws when they are there but cannot be read (`abiMismatch` for another layout).
    public static func pinned(at layout: PinLayout, bucketCount: Int) throws -> PinnedCanary? {
        let path = layout.path(ofShared: RP_MAP_CANARY)
        guard (try? Syscall.linkStatus(path)) != nil else { return nil }
        let canary = try BPFMap(pinnedAt: path, name: RP_MAP_CANARY, keySize: MemoryLayout<UInt32>.size,
                                valueSize: MemoryLayout<rp_canary>.size, readOnly: true)
        guard let value = try canary.lookup(0, as: rp_canary.self), value.phase != RP_CANARY_NONE.rawValue else {
            return nil
        }
        let buckets = try BPFMap(pinnedAt: layout.path(ofShared: RP_MAP_CANARY_BUCKETS), name: RP_MAP_CANARY_BUCKETS,
                                 keySize: MemoryLayout<UInt32>.size, valueSize: MemoryLayout<UInt32>.size,
                                 readOnly: true)
        guard Int(buckets.maxEntries) == bucketCount else { return nil }
        let table = try (0..<UInt32(bucketCount)).map {
            try buckets.lookup($0, as: UInt32.self) ?? RP_CANARY_NOT_A_BUCKET
        }
        return PinnedCanary(value: value, buckets: table)
    }

    /// Pins the maps at `layout`'s service folder, in place of whatever is pinned there.
    public func pin(at layout: PinLayout) throws {
        for map in [canary, buckets] {
            let path = layout.path(ofShared: map.name)
            _ = unlink(path)
            try map.pin(at: path)
        }
    }

    /// Makes the maps say `record` (nil: no canary); writes only what changed since the last call.
    public func publish(_ record: PinnedCanary?) throws {
        guard !writtenAny || record != written else { return }
        if record?.original != written?.original || !writtenAny {
            let values = record?.bucketValues(bucketCount: bucketCount)
                ?? Array(repeating: RP_CANARY_NOT_A_BUCKET, count: bucketCount)
            for (bucket, value) in values.enumerated() { try buckets.update(UInt32(bucket), value) }
        }
        try canary.update(0, record?.value ?? rp_canary())
        written = record
        writtenAny = true
    }
}
