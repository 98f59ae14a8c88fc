#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import SystemPackage

/// One service's `rp_leaving` map (bpf/records.h): the workers that left their slot and still
/// run, by pid, pinned beside the service's other maps so that a daemon started on the pins
/// (after a kill, or its own exec) takes them over instead of leaving them to run unseen with
/// the service's port. The daemon is its only writer: it rewrites the map from what it tracks
/// (`publish`), so the map cannot disagree with the daemon for longer than one turn of its loop.
public final class LeavingRecords: @unchecked Sendable {
    public struct Record: Equatable, Sendable {
        public var pid: Int32
        public var value: rp_leaving_worker

        public init(pid: Int32, slot: UInt32, generation: UInt32, startTime: UInt64, holdUntilNs: UInt64,
                    state: rp_leaving_state) {
            self.pid = pid
            value = rp_leaving_worker(slot: slot, generation: generation, start_time: startTime,
                                      hold_until_ns: holdUntilNs, state: state.rawValue,
                                      version: UInt32(RP_RECORDS_VERSION))
        }

        public init(pid: Int32, value: rp_leaving_worker) {
            self.pid = pid
            self.value = value
        }

        public static func == (a: Record, b: Record) -> Bool {
            a.pid == b.pid && a.value.slot == b.value.slot && a.value.generation == b.value.generation
                && a.value.start_time == b.value.start_time && a.value.hold_until_ns == b.value.hold_until_ns
                && a.value.state == b.value.state
        }
    }

    let map: BPFMap
    /// What the map holds, as this process last wrote it.
    private var written: [Int32: Record] = [:]

    static let valueSize = MemoryLayout<rp_leaving_worker>.size

    /// A new, empty map (allocated per entry: it costs memory only while workers leave).
    public init() throws {
        map = try BPFMap(creating: BPF_MAP_TYPE_HASH, name: RP_MAP_LEAVING, keySize: MemoryLayout<UInt32>.size,
                         valueSize: Self.valueSize, maxEntries: UInt32(RP_MAX_LEAVING),
                         flags: UInt32(BPF_F_NO_PREALLOC))
    }

    /// The records pinned at `layout` by a previous daemon; empty when none are pinned. Throws
    /// when they cannot be read, `abiMismatch` for another version's.
    public static func pinned(at layout: PinLayout) throws -> [Record] {
        let path = layout.path(ofShared: RP_MAP_LEAVING)
        guard (try? Syscall.linkStatus(path)) != nil else { return [] }
        let map = try BPFMap(pinnedAt: path, name: RP_MAP_LEAVING, keySize: MemoryLayout<UInt32>.size,
                             valueSize: valueSize)
        return try map.entries(as: (UInt32, rp_leaving_worker).self).map { Record(pid: Int32(bitPattern: $0), value: $1) }
    }

    /// Pins the map at `layout`'s service folder, in place of whatever is pinned there.
    public func pin(at layout: PinLayout) throws {
        let path = layout.path(ofShared: RP_MAP_LEAVING)
        _ = unlink(path)
        try map.pin(at: path)
    }

    /// Makes the map hold exactly `records`: writes what changed since the last call.
    public func publish(_ records: [Record]) throws {
        let next = Dictionary(records.map { ($0.pid, $0) }) { _, last in last }
        for (pid, record) in next where written[pid] != record {
            try map.update(UInt32(bitPattern: pid), record.value)
        }
        for pid in written.keys where next[pid] == nil { _ = try map.delete(UInt32(bitPattern: pid)) }
        written = next
    }
}
