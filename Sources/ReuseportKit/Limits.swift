import CReuseportABI

/// A slot index: 0..<RP_MAX_SLOTS (bpf/dispatch.h), the keys of rp_sockets, rp_slot_stats and
/// rp_slot_state. Every check of a slot index uses `range`.
public struct Slot: Hashable, Sendable, CustomStringConvertible {
    public static let range = 0...Int(RP_MAX_SLOTS) - 1
    public let index: UInt32

    /// Throws `invalidArgument` naming `what` when `index` is beyond the last slot.
    public init(_ index: UInt32, what: String = "slot") throws {
        guard Self.range.contains(Int(index)) else {
            throw ReuseportError.invalidArgument("\(what) \(index) is beyond the last possible slot, \(Self.range.upperBound)")
        }
        self.index = index
    }

    public var description: String { "\(index)" }
}

/// A count bounded by a limit of bpf/dispatch.h, checked once, in `init(_:what:)`.
public protocol BoundedCount: Hashable, Sendable, CustomStringConvertible {
    static var range: ClosedRange<Int> { get }
    /// What an error calls a count that is out of range ("slot count").
    static var noun: String { get }
    var value: Int { get }
    init(unchecked value: Int)
}

extension BoundedCount {
    /// Throws `invalidArgument` naming `what` (default: `noun`) when `value` is outside `range`.
    public init(_ value: Int, what: String = Self.noun) throws {
        guard Self.range.contains(value) else {
            throw ReuseportError.invalidArgument("\(what) \(value) is outside \(Self.range)")
        }
        self.init(unchecked: value)
    }

    public var description: String { "\(value)" }
}

/// How many slots (workers) a service has: 1...RP_MAX_SLOTS.
public struct SlotCount: BoundedCount {
    public static let range = 1...Int(RP_MAX_SLOTS)
    public static let noun = "slot count"
    public let value: Int
    public init(unchecked value: Int) { self.value = value }
}

/// How many entries of rp_buckets a service uses: 1...RP_MAX_BUCKETS. The program drops every
/// packet of a configuration outside it.
public struct BucketCount: BoundedCount {
    public static let range = 1...Int(RP_MAX_BUCKETS)
    public static let noun = "bucket count"
    public let value: Int
    public init(unchecked value: Int) { self.value = value }
}

/// How many flow records a service's rp_flows holds: 1...RP_MAX_TRACKED_FLOWS (max_tracked_flows).
public struct TrackedFlowCount: BoundedCount {
    public static let range = 1...Int(RP_MAX_TRACKED_FLOWS)
    public static let noun = "tracked flow count"
    public let value: Int
    public init(unchecked value: Int) { self.value = value }
}

extension TrackedFlowCount {
    /// The records a service holds when its configuration names no `max_tracked_flows`:
    /// RP_TRACKED_FLOWS_PER_WORKER for each worker it starts with, at most RP_DEFAULT_TRACKED_FLOWS.
    /// rp_flows is a hash table: even without preallocation the kernel allocates its buckets (one
    /// per entry, rounded up to a power of two, 16 bytes each on 6.18) when the map is created,
    /// so its size is memory the service holds all its life (bench item 6).
    public static func sized(workers: Int) -> TrackedFlowCount {
        TrackedFlowCount(unchecked: min(Int(RP_DEFAULT_TRACKED_FLOWS),
                                        max(1, workers) * Int(RP_TRACKED_FLOWS_PER_WORKER)))
    }

    /// rp_untracked's size for `records`: a quarter of them, at least RP_MIN_UNTRACKED_MARKERS.
    public var untrackedMarkers: Int { max(value / 4, Int(RP_MIN_UNTRACKED_MARKERS)) }
}

/// How many slots the slot-indexed maps of a service hold (rp_sockets, rp_slot_stats,
/// rp_quic_slot_stats, rp_slot_state): 1...RP_MAX_SLOTS, fixed when they are made.
public struct SlotCapacity: BoundedCount {
    public static let range = 1...Int(RP_MAX_SLOTS)
    public static let noun = "slot capacity"
    public let value: Int
    public init(unchecked value: Int) { self.value = value }

    /// The rule for a service of `workers`: the next power of two of at least
    /// RP_SLOTS_PER_WORKER × workers and RP_MIN_SLOT_CAPACITY, at most RP_MAX_SLOTS. An upgrade
    /// starts a whole generation beside the working one, a canary adds its slots, and up to
    /// `PlacementModel.maxDrainingGenerations` older generations may still drain: four times the
    /// workers leave room for an upgrade while two older generations drain, or for a scale to
    /// twice the workers during one. A change that needs more slots than the maps hold is refused
    /// with the way out (a reload to the new worker count rebuilds the service with larger maps,
    /// make-before-break).
    public static func sized(workers: Int) -> SlotCapacity {
        var capacity = Int(RP_MIN_SLOT_CAPACITY)
        while capacity < Int(RP_SLOTS_PER_WORKER) * max(1, workers) && capacity < Int(RP_MAX_SLOTS) { capacity *= 2 }
        return SlotCapacity(unchecked: min(capacity, Int(RP_MAX_SLOTS)))
    }
}
