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

/// How many slots (workers) a service has: 1...RP_MAX_SLOTS. Every check of a slot count uses
/// `range`.
public struct SlotCount: Hashable, Sendable, CustomStringConvertible {
    public static let range = 1...Int(RP_MAX_SLOTS)
    public let value: Int

    /// Throws `invalidArgument` naming `what` when `value` is outside `range`.
    public init(_ value: Int, what: String = "slot count") throws {
        guard Self.range.contains(value) else {
            throw ReuseportError.invalidArgument("\(what) \(value) is outside \(Self.range)")
        }
        self.value = value
    }

    public var description: String { "\(value)" }
}

/// How many entries of rp_buckets a service uses: 1...RP_MAX_BUCKETS. The program drops every
/// packet of a configuration outside it. Every check of a bucket count uses `range`.
public struct BucketCount: Hashable, Sendable, CustomStringConvertible {
    public static let range = 1...Int(RP_MAX_BUCKETS)
    public let value: Int

    /// Throws `invalidArgument` naming `what` when `value` is outside `range`.
    public init(_ value: Int, what: String = "bucket count") throws {
        guard Self.range.contains(value) else {
            throw ReuseportError.invalidArgument("\(what) \(value) is outside \(Self.range)")
        }
        self.value = value
    }

    public var description: String { "\(value)" }
}
