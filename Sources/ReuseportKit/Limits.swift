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
