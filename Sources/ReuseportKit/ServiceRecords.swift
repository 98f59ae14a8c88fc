#if canImport(Glibc)
import Glibc
#endif
import CLibbpf

/// One service's records that the daemon pins beside the program's maps and the program never
/// reads (bpf/records.h): worker state by slot (rp_slot_state), the placement change in progress
/// with the generation numbers (rp_transition), and the table the pending switch writes
/// (rp_next_buckets). The daemon creates them (`BPFMap(creating:)`), so a change of their layout
/// is a change of RP_RECORDS_VERSION, not of the program's RP_ABI_VERSION: a later daemon reads
/// the version (`Version`), and migrates or refuses them without giving up the program's maps.
public struct ServiceRecords: @unchecked Sendable {
    public let slotState: BPFMap
    public let transition: BPFMap
    public let nextBuckets: BPFMap

    /// Their names, which are also the file names of their pins.
    public static let names = [RP_MAP_SLOT_STATE, RP_MAP_TRANSITION, RP_MAP_NEXT_BUCKETS]

    /// Key and value size of each.
    static let layouts: [String: (key: Int, value: Int)] = [
        RP_MAP_SLOT_STATE: (4, MemoryLayout<rp_slot_state>.size),
        RP_MAP_TRANSITION: (4, MemoryLayout<rp_transition>.size),
        RP_MAP_NEXT_BUCKETS: (4, MemoryLayout<rp_slot_t>.size),
    ]

    private init(open: DispatchMaps.Opener) throws {
        func map(_ name: String) throws -> BPFMap { try DispatchMaps.open(name, layouts: Self.layouts, with: open) }
        slotState = try map(RP_MAP_SLOT_STATE)
        transition = try map(RP_MAP_TRANSITION)
        nextBuckets = try map(RP_MAP_NEXT_BUCKETS)
    }

    /// New, zeroed records; rp_next_buckets has `bucketCount` entries, like the service's rp_buckets,
    /// and rp_slot_state `slotCapacity` rows, like its slot-indexed maps.
    public init(bucketCount: Int, slotCapacity: Int = Int(RP_MAX_SLOTS)) throws {
        let entries: [String: UInt32] = [RP_MAP_SLOT_STATE: UInt32(try SlotCapacity(slotCapacity).value), RP_MAP_TRANSITION: 1,
                                         RP_MAP_NEXT_BUCKETS: UInt32(try BucketCount(bucketCount).value)]
        try self.init { name, keySize, valueSize in
            try BPFMap(creating: BPF_MAP_TYPE_ARRAY, name: name, keySize: keySize, valueSize: valueSize,
                       maxEntries: entries[name]!)
        }
    }

    /// The records a daemon pinned at `layout`; `readOnly` as for `DispatchMaps(pinned:)`. Their
    /// layouts are checked (`abiMismatch`); whether their version is this daemon's is `Version`'s.
    public init(pinned layout: PinLayout, readOnly: Bool = false) throws {
        try self.init { name, keySize, valueSize in
            try BPFMap(pinnedAt: layout.path(ofShared: name), name: name, keySize: keySize, valueSize: valueSize,
                       readOnly: readOnly)
        }
    }

    public var all: [BPFMap] { [slotState, transition, nextBuckets] }

    /// Pins the records at `layout`'s service folder with rp_records_version, a new map that says
    /// RP_RECORDS_VERSION (it holds a constant: a daemon that takes records over and pins them
    /// again writes its own version, which the records then have, migrated where needed).
    func pin(at layout: PinLayout) throws {
        for map in all { try map.pin(at: layout.path(ofShared: map.name)) }
        let version = try BPFMap(creating: BPF_MAP_TYPE_ARRAY, name: RP_MAP_RECORDS_VERSION,
                                 keySize: MemoryLayout<UInt32>.size, valueSize: MemoryLayout<UInt32>.size,
                                 maxEntries: 1)
        try version.update(0, UInt32(RP_RECORDS_VERSION))
        try version.pin(at: layout.path(ofShared: RP_MAP_RECORDS_VERSION))
    }

    /// The version of the records pinned at a service folder, and what a daemon does with them.
    public enum Version: Equatable, Sendable {
        /// This daemon's version: taken over as they are.
        case current
        /// An older version this daemon knows: taken over once brought to this version (`migrations`).
        case migrate(from: UInt32)
        /// A version this daemon cannot read (newer, or unknown): it does not take them over.
        case refuse(found: UInt32)

        /// The decision for records of version `found` (pure: what the daemon does with them).
        /// Version 1 had no rp_records_version: the caller passes 1 when none is pinned.
        public init(found: UInt32, current: UInt32 = UInt32(RP_RECORDS_VERSION)) {
            switch found {
            case current: self = .current
            case _ where found < current && ServiceRecords.migrations.contains(found): self = .migrate(from: found)
            default: self = .refuse(found: found)
            }
        }

        /// The version pinned at `layout`: 1 when rp_records_version is not there (daemons of
        /// records version 1 pinned none). Throws when it is there but cannot be read.
        public static func pinned(at layout: PinLayout) throws -> UInt32 {
            let path = layout.path(ofShared: RP_MAP_RECORDS_VERSION)
            guard (try? Syscall.linkStatus(path)) != nil else { return 1 }
            let map = try BPFMap(pinnedAt: path, name: RP_MAP_RECORDS_VERSION, keySize: MemoryLayout<UInt32>.size,
                                 valueSize: MemoryLayout<UInt32>.size, readOnly: true)
            return try map.lookup(0, as: UInt32.self) ?? 0
        }

        /// Throws `recordsVersion` (naming both versions) unless records of this version are taken
        /// over, as they are or migrated.
        public func check(at layout: PinLayout) throws {
            guard case .refuse(let found) = self else { return }
            throw ReuseportError.recordsVersion(directory: layout.serviceDirectory, found: found)
        }

        /// The decision for the records pinned at `layout` (`pinned(at:)`), checked (`check(at:)`).
        public static func checked(at layout: PinLayout) throws -> Version {
            let version = Version(found: try pinned(at: layout))
            try version.check(at: layout)
            return version
        }
    }

    /// The older versions this daemon migrates. 1 → 2 rewrites nothing: the three maps kept their
    /// layouts when they left the object (ABI 8, which `DispatchMaps.checkConfiguredABI` requires of
    /// the pins anyway), and `pin(at:)` adds rp_records_version. 2 → 3 rewrites nothing either:
    /// version 3 adds rp_canary and rp_canary_buckets (`CanaryRecords`), and pins without them
    /// recorded no canary (the daemon pins its own when it takes the records over). A later
    /// version that changes a layout reads the old one here and writes the new.
    static let migrations: Set<UInt32> = [1, 2]
}
