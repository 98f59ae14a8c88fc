#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// The steering program of one listener, loaded from the object embedded in the binary
/// (bpf/dispatch.bpf.c), with its own socket array and the service's shared maps.
///
/// A reuseport group is one (protocol, address, port); a service listening on several
/// has one group each, and `bpf_sk_select_reuseport()` only selects sockets of the
/// group the packet arrived on. So each listener gets its own program instance and
/// REUSEPORT_SOCKARRAY, while config, buckets, counters and worker state are created
/// once and handed to the others (`bpf_map__reuse_fd`).
///
/// Needs: SK_REUSEPORT programs and REUSEPORT_SOCKARRAY (4.19); the verifier's statistics
/// log level (5.2). Uses bpf_ktime_get_coarse_ns() where the kernel has it (5.11, `CoarseClock`).
/// Tested on 5.10 to 7.2 (docs/kernel-support.md).
public final class DispatchProgram: ReuseportProgram, @unchecked Sendable {
    private let descriptor: OwnedDescriptor
    /// The loaded program's fd; this object owns it and must outlive its use.
    public var programFD: Int32 { descriptor.fd.rawValue }
    public let maps: DispatchMaps
    public let sockets: SocketArray
    /// What the verifier said when it accepted the program (its cost: processed instructions).
    public let verifier: VerifierReport
    /// Whether this is rp_dispatch_migrate (the kernel moves a closing TCP listener's pending
    /// connections to a live slot) rather than rp_dispatch (they are reset): see
    /// `ReuseportMigration`.
    public let migrates: Bool

    /// Loads the program. With `shared`, the new instance uses those maps instead of
    /// creating its own (a second listener of the same service, or the maps a previous daemon
    /// pinned: their sizes are what that daemon made them). Otherwise rp_flows and rp_untracked
    /// are created for `trackedFlows` records (rp_untracked: `TrackedFlowCount.untrackedMarkers`),
    /// the slot-indexed maps (rp_slot_stats, rp_quic_slot_stats, the daemon's rp_slot_state) for
    /// `slotCapacity` slots, and rp_buckets and the daemon's rp_next_buckets
    /// (ServiceRecords) for `bucketCount` entries (the object's RP_MAX_BUCKETS is the upper bound): a service of 4,096
    /// buckets holds 32 KiB in each, not 512 KiB.
    ///
    /// `object`: another build of bpf/dispatch.bpf.c with the same maps (the benchmarks' build
    /// without flow tracking); default: the one embedded in this binary. `socketArray`: use
    /// that listener's array too (a socket can be in one array only), for such a build. This
    /// listener's own rp_sockets holds as many slots as the service's rp_slot_stats.
    public init(sharing shared: DispatchMaps? = nil, trackedFlows: Int = Int(RP_DEFAULT_TRACKED_FLOWS),
                bucketCount: Int = Int(RP_MAX_BUCKETS), slotCapacity: Int = Int(RP_MAX_SLOTS),
                object bytes: (pointer: UnsafePointer<UInt8>, count: Int, name: String)? = nil,
                socketArray: SocketArray? = nil) throws {
        let object = try bytes.map { try EmbeddedObject($0.pointer, count: $0.count, name: $0.name) }
            ?? EmbeddedObject(rp_dispatch_object(), count: rp_dispatch_object_size(), name: "dispatch.bpf.o")
        let capacity = try shared?.slotCapacity ?? SlotCapacity(slotCapacity).value
        if let socketArray {
            try object.reuse(map: RP_MAP_SOCKETS, fd: socketArray.map.fd)
        } else {
            try object.setMaxEntries(map: RP_MAP_SOCKETS, UInt32(capacity))
        }
        if let shared {
            for map in shared.programMaps { try object.reuse(map: map.name, fd: map.fd) }
        } else {
            let records = try TrackedFlowCount(trackedFlows)
            try object.setMaxEntries(map: RP_MAP_FLOWS, UInt32(records.value))
            try object.setMaxEntries(map: RP_MAP_UNTRACKED, UInt32(records.untrackedMarkers))
            try object.setMaxEntries(map: RP_MAP_BUCKETS, UInt32(try BucketCount(bucketCount).value))
            try object.setMaxEntries(map: RP_MAP_SLOT_STATS, UInt32(capacity))
            try object.setMaxEntries(map: RP_MAP_QUIC_SLOT_STATS, UInt32(capacity))
        }
        try object.setConstant(RP_CONST_COARSE_CLOCK, CoarseClock.isSupported ? 1 : 0)
        migrates = ReuseportMigration.isSupported
        let name = migrates ? RP_PROG_DISPATCH_MIGRATE : RP_PROG_DISPATCH
        try object.setAutoload(program: RP_PROG_DISPATCH, !migrates)
        try object.setAutoload(program: RP_PROG_DISPATCH_MIGRATE, migrates)
        try object.load()
        verifier = object.verifierReports[name] ?? VerifierReport(log: "")
        // Keep our own copies: the object (and its fds) is closed when init returns.
        descriptor = try object.programFD(name)
        maps = try DispatchMaps(records: shared?.records ?? ServiceRecords(bucketCount: bucketCount,
                                                                            slotCapacity: capacity)) {
            name, keySize, valueSize in
            try object.openMap(name, keySize: keySize, valueSize: valueSize)
        }
        sockets = try SocketArray(RP_MAP_SOCKETS, in: object)
    }

    /// Pins this listener's program and socket array (the shared maps are pinned once,
    /// through `DispatchMaps.pin`).
    public func pin(_ layout: PinLayout, listener: Int) throws {
        try sockets.map.pin(at: layout.path(ofSockets: listener))
        if bpf_obj_pin(programFD, layout.path(ofProgram: listener)) != 0 {
            throw ReuseportError.system("bpf_obj_pin(\(layout.path(ofProgram: listener)))", errno)
        }
    }
}
