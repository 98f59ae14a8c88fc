#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI
import SystemPackage

/// The maps shared by every listener of one service: the program's (bpf/dispatch.h:
/// configuration, bucket table, fallback table, counters) and the daemon's records beside them
/// (bpf/records.h: worker state, the change in progress). Each listener has its own socket array.
///
/// Anyone may read them (reuseportctl opens the pins); only the service's
/// `ServiceDataPlane` writes them: the write operations are internal to ReuseportKit.
public final class DispatchMaps: @unchecked Sendable {
    public let config: BPFMap
    public let buckets: BPFMap
    public let fallback: BPFMap
    public let slotStats: BPFMap
    public let globalStats: BPFMap
    public let slotState: BPFMap
    /// Flow records of a placement change (FlowRecords.swift), and the flows they could not hold.
    public let flows: BPFMap
    public let untracked: BPFMap
    public let flowStats: BPFMap
    let recordBudget: BPFMap
    /// The placement change in progress and its target table (Transition.swift).
    public let transition: BPFMap
    public let nextBuckets: BPFMap
    /// The daemon's records among these (slotState, transition, nextBuckets): not the object's.
    public let records: ServiceRecords
    /// QUIC connection-ID steering's counters (its layout is rp_config.quic).
    public let quicStats: BPFMap
    public let quicSlotStats: BPFMap

    /// The program's maps, by their names in the object (and as pin file names).
    static let programNames = [RP_MAP_CONFIG, RP_MAP_BUCKETS, RP_MAP_FALLBACK, RP_MAP_SLOT_STATS, RP_MAP_GLOBAL_STATS,
                               RP_MAP_FLOWS, RP_MAP_UNTRACKED, RP_MAP_FLOW_STATS, RP_MAP_RECORD_BUDGET,
                               RP_MAP_QUIC_STATS, RP_MAP_QUIC_SLOT_STATS]
    /// Every pin file name of these maps: the program's and the records'.
    public static let names = programNames + ServiceRecords.names

    /// Key and value size of each map.
    static let layouts: [String: (key: Int, value: Int)] = [
        RP_MAP_CONFIG: (4, MemoryLayout<rp_config>.size),
        RP_MAP_BUCKETS: (4, MemoryLayout<rp_slot_t>.size),
        RP_MAP_FALLBACK: (4, MemoryLayout<rp_slot_t>.size),
        RP_MAP_SLOT_STATS: (4, MemoryLayout<rp_slot_stats>.size),
        RP_MAP_GLOBAL_STATS: (4, MemoryLayout<rp_global_stats>.size),
        RP_MAP_FLOWS: (MemoryLayout<rp_flow_key>.size, MemoryLayout<rp_flow>.size),
        RP_MAP_UNTRACKED: (MemoryLayout<rp_flow_key>.size, 4),
        RP_MAP_FLOW_STATS: (4, MemoryLayout<rp_flow_stats>.size),
        RP_MAP_RECORD_BUDGET: (4, MemoryLayout<rp_record_budget>.size),
        RP_MAP_QUIC_STATS: (4, MemoryLayout<rp_quic_stats>.size),
        RP_MAP_QUIC_SLOT_STATS: (4, MemoryLayout<rp_quic_slot_stats>.size),
    ]

    /// A map opener: name, key size, value size.
    typealias Opener = (_ name: String, _ keySize: Int, _ valueSize: Int) throws -> BPFMap

    /// Opens `name` with `open` at its layout in `layouts` (this type's or `ServiceRecords`').
    static func open(_ name: String, layouts: [String: (key: Int, value: Int)], with open: Opener) throws -> BPFMap {
        let layout = layouts[name]!
        return try open(name, layout.key, layout.value)
    }

    /// `open` gives the program's maps by name; `records` are the daemon's.
    init(records: ServiceRecords, open: Opener) throws {
        func map(_ name: String) throws -> BPFMap { try Self.open(name, layouts: Self.layouts, with: open) }
        config = try map(RP_MAP_CONFIG)
        buckets = try map(RP_MAP_BUCKETS)
        fallback = try map(RP_MAP_FALLBACK)
        slotStats = try map(RP_MAP_SLOT_STATS)
        globalStats = try map(RP_MAP_GLOBAL_STATS)
        slotState = records.slotState
        flows = try map(RP_MAP_FLOWS)
        untracked = try map(RP_MAP_UNTRACKED)
        flowStats = try map(RP_MAP_FLOW_STATS)
        recordBudget = try map(RP_MAP_RECORD_BUDGET)
        transition = records.transition
        nextBuckets = records.nextBuckets
        self.records = records
        quicStats = try map(RP_MAP_QUIC_STATS)
        quicSlotStats = try map(RP_MAP_QUIC_SLOT_STATS)
    }

    /// Opens the maps a daemon pinned for one service; `readOnly` (BPF_F_RDONLY) for a reader:
    /// the write operations then fail with EPERM.
    public convenience init(pinned layout: PinLayout, readOnly: Bool = false) throws {
        try self.init(records: ServiceRecords(pinned: layout, readOnly: readOnly)) { name, keySize, valueSize in
            try BPFMap(pinnedAt: layout.path(ofShared: name), name: name, keySize: keySize, valueSize: valueSize,
                       readOnly: readOnly)
        }
    }

    /// How many slots the slot-indexed maps hold: the least of their sizes (pins of an earlier
    /// build hold RP_MAX_SLOTS each). Every slot a placement uses is below it.
    public var slotCapacity: Int {
        Int(min(slotStats.maxEntries, quicSlotStats.maxEntries, slotState.maxEntries))
    }

    /// Whether the slot-indexed maps have room for a service of `workers` and an upgrade's new
    /// generation beside them (twice the workers). A service is built with more room than that
    /// (`SlotCapacity.sized`: four times), but one that has this much keeps its maps, its sockets
    /// and its workers: only beyond it does a reload (or a start on pins) build the service
    /// again with larger maps, which gives every slot a new socket and worker.
    public func holdsSlots(forWorkers workers: Int) -> Bool {
        2 * max(1, workers) <= slotCapacity
    }

    /// The program's maps, in the order of `programNames`: what a second listener's program reuses.
    var programMaps: [BPFMap] {
        [config, buckets, fallback, slotStats, globalStats, flows, untracked, flowStats, recordBudget, quicStats,
         quicSlotStats]
    }

    /// Every shared map, in the order of `names`.
    public var all: [BPFMap] { programMaps + records.all }

    /// Pins every shared map at `layout`, the records with their version (rp_records_version).
    public func pin(_ layout: PinLayout) throws {
        for map in programMaps { try map.pin(at: layout.path(ofShared: map.name)) }
        try records.pin(at: layout)
    }

    // MARK: configuration

    /// The configuration; a zeroed one (abi_version 0) before the first write.
    public func readConfig() throws -> rp_config {
        try config.lookup(0, as: rp_config.self) ?? rp_config()
    }

    /// Writes rp_config whole: `changing` sets RP_CONFIG_CHANGING (some bucket may carry flags),
    /// `quic` the QUIC layout and RP_CONFIG_QUIC (nil: off).
    func writeConfig(seed: UInt32, bucketCount: Int, slotCount: Int, liveCount: Int, recordCostNs: UInt32,
                     changing: Bool, quic: QuicSteering?) throws {
        _ = try BucketCount(bucketCount)
        // A service has at least one slot; none of them may hold a socket (live count 0).
        _ = try SlotCount(slotCount)
        if liveCount != 0 { _ = try SlotCount(liveCount, what: "live slot count") }
        let value = rp_config(abi_version: UInt32(RP_ABI_VERSION), seed: seed, bucket_count: UInt32(bucketCount),
                              slot_count: UInt32(slotCount), live_count: UInt32(liveCount),
                              record_cost_ns: recordCostNs,
                              flags: (changing ? UInt32(RP_CONFIG_CHANGING) : 0) | (quic != nil ? UInt32(RP_CONFIG_QUIC) : 0),
                              reserved: 0, quic: quic?.config ?? rp_quic_config())
        try config.update(0, value)
    }

    /// Sets or clears RP_CONFIG_CHANGING in the configuration as it is (one write, none when it
    /// already says so). The program reads bucket flags only while it is set: the caller sets
    /// it before writing the first flag and clears it after the last is gone.
    func writeChanging(_ changing: Bool) throws {
        var value = try readConfig()
        let flags = changing ? value.flags | UInt32(RP_CONFIG_CHANGING) : value.flags & ~UInt32(RP_CONFIG_CHANGING)
        guard value.abi_version != 0, flags != value.flags else { return }
        value.flags = flags
        try config.update(0, value)
    }

    /// Whether rp_config says a change runs (RP_CONFIG_CHANGING).
    public func readChanging() throws -> Bool {
        try readConfig().flags & UInt32(RP_CONFIG_CHANGING) != 0
    }

    /// The service's QUIC steering layout (rp_config.quic); nil when it has none (steering off).
    public func readQuicSteering() throws -> QuicSteering? {
        QuicSteering(try readConfig().quic)
    }

    /// Refuses maps written by a program of another ABI version.
    public func checkConfiguredABI() throws {
        let version = try readConfig().abi_version
        guard version == UInt32(RP_ABI_VERSION) else {
            throw ReuseportError.abiMismatch(map: RP_MAP_CONFIG, field: "abi_version",
                                             kernel: Int(version), expected: Int(RP_ABI_VERSION))
        }
    }

    // MARK: buckets

    /// The slots of the first `count` entries of the bucket table (default: the configured
    /// count), without their transition flags.
    public func readBuckets(count: Int? = nil) throws -> [UInt32] {
        try readBucketValues(count: count).map { rp_bucket_slot($0) }
    }

    /// The bucket table's values as the program reads them: slot and RP_BUCKET_* flags.
    public func readBucketValues(count: Int? = nil) throws -> [UInt32] {
        let count = try count ?? Int(readConfig().bucket_count)
        return try (0..<UInt32(count)).map { try buckets.lookup($0, as: rp_slot_t.self) ?? 0 }
    }

    /// Writes the bucket table (slot | RP_BUCKET_* flags); with `previous`, only the entries that differ.
    func writeBuckets(_ table: [UInt32], previous: [UInt32]? = nil) throws {
        try write(table, to: buckets, limit: Int(buckets.maxEntries), previous: previous)
    }

    /// Whether the bucket tables have room for `count` buckets. Their size is the service's bucket
    /// count when they were made (`DispatchProgram`), read from the maps themselves: pins of
    /// another configuration (or of an earlier version, RP_MAX_BUCKETS) answer for themselves.
    public func holdsBuckets(_ count: Int) -> Bool {
        count <= Int(buckets.maxEntries) && count <= Int(nextBuckets.maxEntries)
    }

    /// The table a placement change in progress switches to (rp_next_buckets).
    public func readNextBuckets(count: Int) throws -> [UInt32] {
        try (0..<UInt32(count)).map { try nextBuckets.lookup($0, as: rp_slot_t.self) ?? 0 }
    }

    func writeNextBuckets(_ table: [UInt32], previous: [UInt32]? = nil) throws {
        try write(table, to: nextBuckets, limit: Int(nextBuckets.maxEntries), previous: previous)
    }

    /// The placement change in progress (phase RP_TRANSITION_NONE when there is none).
    public func readTransition() throws -> rp_transition {
        try transition.lookup(0, as: rp_transition.self) ?? rp_transition()
    }

    func writeTransition(_ value: rp_transition) throws {
        try transition.update(0, value)
    }

    /// The flow-tracking counters, summed over CPUs.
    public func flowCounters() throws -> rp_flow_stats {
        try flowStats.lookupPerCPU(0, as: rp_flow_stats.self).reduce(into: rp_flow_stats()) { sum, cpu in
            sum.recorded &+= cpu.recorded
            sum.untracked &+= cpu.untracked
            sum.untracked_uncounted &+= cpu.untracked_uncounted
            sum.rate_refused &+= cpu.rate_refused
            sum.pinned &+= cpu.pinned
            sum.stale &+= cpu.stale
        }
    }

    /// The fallback table (RP_FALLBACK_BUCKETS entries): which live slot each entry names.
    public func readFallback() throws -> [UInt32] {
        try (0..<UInt32(RP_FALLBACK_BUCKETS)).map { try fallback.lookup($0, as: rp_slot_t.self) ?? 0 }
    }

    /// Writes the fallback table; with `previous`, only the entries that differ.
    func writeFallback(_ table: [UInt32], previous: [UInt32]? = nil) throws {
        try write(table, to: fallback, limit: Int(RP_FALLBACK_BUCKETS), previous: previous)
    }

    /// Writes a table of slots (index → slot) into `map`: every entry, or those that differ from `previous`.
    private func write(_ table: [UInt32], to map: BPFMap, limit: Int, previous: [UInt32]?) throws {
        guard table.count <= limit else {
            throw ReuseportError.invalidArgument("\(map.name) table of \(table.count) entries exceeds \(limit)")
        }
        for (index, value) in table.enumerated() where previous == nil || previous![safe: index] != value {
            _ = try Slot(rp_bucket_slot(value), what: "\(map.name)[\(index)]: slot")
            try map.update(UInt32(index), value)
        }
    }

    // MARK: counters

    /// The slot's counters, summed over CPUs.
    public func slotCounters(_ slot: UInt32) throws -> rp_slot_stats {
        try slotStats.lookupPerCPU(slot, as: rp_slot_stats.self).reduce(into: rp_slot_stats()) { sum, cpu in
            sum.packets &+= cpu.packets
            sum.bytes &+= cpu.bytes
            sum.fallbacks &+= cpu.fallbacks
        }
    }

    /// The global counters, summed over CPUs.
    public func globalCounters() throws -> rp_global_stats {
        try globalStats.lookupPerCPU(0, as: rp_global_stats.self).reduce(into: rp_global_stats()) { sum, cpu in
            sum.dropped_no_slot &+= cpu.dropped_no_slot
            sum.unparsable &+= cpu.unparsable
            sum.fallbacks &+= cpu.fallbacks
            sum.select_errors &+= cpu.select_errors
            sum.migrated &+= cpu.migrated
            sum.migrate_failed &+= cpu.migrate_failed
        }
    }

    /// The QUIC counters of the service, summed over CPUs.
    public func quicCounters() throws -> rp_quic_stats {
        try quicStats.lookupPerCPU(0, as: rp_quic_stats.self).reduce(into: rp_quic_stats()) { sum, cpu in
            sum.cid_steered &+= cpu.cid_steered
            sum.initials &+= cpu.initials
            sum.dcid_hashed &+= cpu.dcid_hashed
            sum.unknown_cid &+= cpu.unknown_cid
            sum.fallbacks &+= cpu.fallbacks
            sum.version_negotiation &+= cpu.version_negotiation
            sum.unparsable &+= cpu.unparsable
        }
    }

    /// A slot's QUIC counters, summed over CPUs.
    public func quicSlotCounters(_ slot: UInt32) throws -> rp_quic_slot_stats {
        try quicSlotStats.lookupPerCPU(slot, as: rp_quic_slot_stats.self).reduce(into: rp_quic_slot_stats()) { sum, cpu in
            sum.cid_steered &+= cpu.cid_steered
            sum.dcid_hashed &+= cpu.dcid_hashed
        }
    }

    /// Zeroes a slot's counters (rp_slot_stats, rp_quic_slot_stats) on every CPU: a slot that is
    /// reused starts from zero.
    func resetSlotCounters(_ slot: UInt32) throws {
        for map in [slotStats, quicSlotStats] {
            let cpus = Int(libbpf_num_possible_cpus())
            let stride = (map.valueSize + 7) & ~7
            let zeros = [UInt8](repeating: 0, count: stride * max(cpus, 1))
            var key = slot
            let result = zeros.withUnsafeBytes { bpf_map_update_elem(map.fd, &key, $0.baseAddress, UInt64(BPF_ANY)) }
            if result != 0 { throw ReuseportError.system("bpf_map_update_elem(\(map.name)[\(slot)])", errno) }
        }
    }

    // MARK: worker state

    public func readSlotState(_ slot: UInt32) throws -> rp_slot_state {
        try slotState.lookup(slot, as: rp_slot_state.self) ?? rp_slot_state()
    }

    func writeSlotState(_ slot: UInt32, _ state: rp_slot_state) throws {
        try slotState.update(slot, state)
    }
}

extension Array {
    subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}

/// One listener's REUSEPORT_SOCKARRAY: slot → socket.
public final class SocketArray: @unchecked Sendable {
    public let map: BPFMap

    /// A REUSEPORT_SOCKARRAY's layout: a u32 slot key; a u64 value (an fd written, a cookie read).
    static let keySize = MemoryLayout<UInt32>.size
    static let valueSize = MemoryLayout<UInt64>.size

    init(map: BPFMap) { self.map = map }

    /// Takes over a socket array from a descriptor (kept in systemd's fd store by a previous
    /// daemon): refused unless it is a REUSEPORT_SOCKARRAY of this layout, of 1...RP_MAX_SLOTS
    /// slots (its size is kept: the service's other slot maps are made at least as large).
    public convenience init(adopting descriptor: OwnedDescriptor) throws {
        try self.init(map: BPFMap(owning: descriptor, name: RP_MAP_SOCKETS, keySize: SocketArray.keySize,
                                  valueSize: SocketArray.valueSize))
        guard map.type == BPF_MAP_TYPE_REUSEPORT_SOCKARRAY.rawValue, SlotCapacity.range.contains(Int(map.maxEntries))
        else {
            throw ReuseportError.invalidArgument(
                "not a socket array of this daemon (map type \(map.type), \(map.maxEntries) entries)")
        }
    }

    /// The array's descriptor, to keep it in systemd's fd store.
    public var descriptor: FileDescriptor { FileDescriptor(rawValue: map.fd) }

    /// The array pinned for `listener`; `readOnly` (BPF_F_RDONLY) for a reader, which can then
    /// read the cookies but never put a socket of its own in a slot (EPERM).
    public convenience init(pinned layout: PinLayout, listener: Int, readOnly: Bool = false) throws {
        try self.init(map: BPFMap(pinnedAt: layout.path(ofSockets: listener), name: RP_MAP_SOCKETS,
                                  keySize: SocketArray.keySize, valueSize: SocketArray.valueSize, readOnly: readOnly))
    }

    /// The array named `name` in a loaded object.
    convenience init(_ name: String, in object: EmbeddedObject) throws {
        try self.init(map: object.openMap(name, keySize: SocketArray.keySize, valueSize: SocketArray.valueSize))
    }

    /// Puts `socket` at `slot`. The socket must be bound (TCP: listening) with SO_REUSEPORT,
    /// in the group the program is attached to, else the kernel answers EINVAL; a socket
    /// already in the array answers EBUSY.
    public func insert(_ socket: ReuseportSocket, at slot: UInt32) throws {
        var key = slot
        var fd = UInt64(socket.fd.rawValue)
        if bpf_map_update_elem(map.fd, &key, &fd, UInt64(BPF_ANY)) != 0 {
            throw ReuseportError.system("bpf_map_update_elem(sockarray \(RP_MAP_SOCKETS)[\(slot)], \(socket.endpoint))", errno)
        }
    }

    /// Empties `slot`; flows of its buckets then fall back to live slots.
    @discardableResult
    public func remove(at slot: UInt32) throws -> Bool { try map.delete(slot) }

    /// The cookie of the socket at `slot`, or nil when the slot is empty.
    public func cookie(at slot: UInt32) throws -> UInt64? { try map.lookup(slot, as: UInt64.self) }

    /// The slots below `limit` that hold a socket.
    public func liveSlots(below limit: Int) throws -> Set<UInt32> {
        try Set((0..<UInt32(limit)).filter { try cookie(at: $0) != nil })
    }
}
