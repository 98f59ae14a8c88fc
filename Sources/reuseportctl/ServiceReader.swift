#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// One service as its pins show it at one moment: configuration, slots with their worker
/// state, counters and sockets, the bucket table and the global counters. `map dump`,
/// `stats` and `which` all read through this.
struct ServiceSnapshot: Sendable {
    struct Listener: Sendable {
        var index: Int
        /// Learnt from the kernel (sock_diag) through the cookie of any socket in the array;
        /// nil when the array is empty or the kernel could not say.
        var endpoint: Endpoint?
        /// Whether an IPv6 wildcard listener also takes IPv4 clients (IPV6_V6ONLY off), as the
        /// kernel says; nil when it did not (the daemon's sockets are v6-only).
        var dualStack: Bool?
        /// Slot → socket cookie for the slots holding a socket.
        var cookies: [UInt32: UInt64]
    }

    struct SlotSocket: Sendable {
        var listener: Int
        var cookie: UInt64
        var diagnosis: SocketDiagnosis?
    }

    struct Slot: Sendable {
        var index: UInt32
        var state: rp_slot_state
        var counters: rp_slot_stats
        /// Packets steered here by QUIC connection ID (zero when QUIC steering is off).
        var quic: rp_quic_slot_stats
        var buckets: Int
        var sockets: [SlotSocket]

        var workerState: WorkerState { WorkerState(rawValue: state.state) }
        /// A scale-down removes the slot: no new flow from the switch on, retires once drained.
        var isLeaving: Bool { state.flags & UInt32(RP_SLOT_LEAVING) != 0 }
        /// A scale-up added the slot: it takes flows from the switch on.
        var isJoining: Bool { state.flags & UInt32(RP_SLOT_JOINING) != 0 }
        /// "leaving", "joining" or "-": the slot's part in a placement change.
        var role: String { isLeaving ? "leaving" : isJoining ? "joining" : "-" }
        var pid: UInt32? { state.pid == 0 ? nil : state.pid }
        /// Receive drops summed over the slot's sockets; nil if none of them reported any.
        var drops: UInt64? {
            let known = sockets.compactMap { $0.diagnosis?.drops }
            return known.isEmpty ? nil : known.reduce(0, +)
        }
        /// Seconds since the last state change, at `now` (CLOCK_REALTIME ns).
        func secondsInState(now: UInt64) -> Double? {
            state.since_ns == 0 || state.since_ns > now ? nil : Double(now - state.since_ns) / 1e9
        }
    }

    var name: String
    var directory: String
    var config: rp_config
    var buckets: [UInt32]
    /// rp_fallback (empty when the service is not configured).
    var fallback: [UInt32]
    var listeners: [Listener]
    var slots: [Slot]
    var global: rp_global_stats
    /// The placement change in progress (phase RP_TRANSITION_NONE: none) and the flow counters.
    var transition = rp_transition()
    var flows = rp_flow_stats()
    /// rp_flows' capacity (max_tracked_flows) and the records it holds now.
    var trackedCapacity: UInt32 = 0
    var records = 0
    /// Buckets learning and pinned now.
    var learningBuckets = 0
    var pinnedBuckets = 0
    /// The QUIC connection-ID layout (rp_config.quic), nil when steering is off, and its counters.
    var quic: QuicSteering?
    var quicCounters: rp_quic_stats
    /// The canary the daemon pinned for its successor (rp_canary), shown when no daemon answers.
    var canary: PinnedCanary?
    /// Why drops are missing, if sock_diag failed.
    var diagnosticsProblem: String?

    var steering: SteeringSnapshot? {
        guard let first = listeners.first else { return nil }
        return steering(listener: first.index)
    }

    /// What the program of `listener` sees: the shared tables and that listener's live slots.
    func steering(listener: Int) -> SteeringSnapshot {
        let live = Set(listeners.first { $0.index == listener }?.cookies.keys.map { $0 } ?? [])
        var snapshot = SteeringSnapshot(seed: config.seed, slotCount: config.slot_count, buckets: buckets,
                                        fallback: fallback, liveCount: config.live_count, liveSlots: live)
        snapshot.quic = quic
        return snapshot
    }
}

/// Reads services from the pin folder.
struct ServiceReader {
    var root: String

    /// The pinned services, or a CtlError naming the folder when there is none.
    func serviceNames() throws -> [String] {
        // What the daemon demands of its pin root, demanded before anything is read there: pins
        // in a folder someone else could change could be anyone's. A folder this user may not
        // even examine is left to the permission message below.
        do throws(UntrustedPathError) {
            try TrustedPath.checkDirectory(root, missing: .allow)
        } catch {
            if error.errno != EACCES && error.errno != EPERM { throw CtlError.untrustedPins(error) }
        }
        var info = stat()
        if stat(root, &info) != 0 || access(root, R_OK | X_OK) != 0 {
            let reason: String
            if errno == EACCES || errno == EPERM {
                reason = "permission denied: reading the pins needs root (or CAP_BPF and CAP_DAC_READ_SEARCH)"
            } else if root.hasPrefix(BPFFilesystem.mountPoint) && !BPFFilesystem.isBPF(BPFFilesystem.mountPoint) {
                reason = "bpffs is not mounted at \(BPFFilesystem.mountPoint)"
            } else {
                reason = "the folder does not exist"
            }
            throw CtlError.noPins(root: root, reason: reason)
        }
        let names = PinLayout.services(under: root)
        if names.isEmpty { throw CtlError.noPins(root: root, reason: "the folder holds no service") }
        return names
    }

    /// `service` if given and pinned, else every pinned service.
    func select(_ service: String?) throws -> [String] {
        let names = try serviceNames()
        guard let service else { return names }
        guard names.contains(service) else { throw CtlError.noSuchService(service, root: root, existing: names) }
        return [service]
    }

    /// `service`, or the only one pinned.
    func selectOne(_ service: String?) throws -> String {
        let names = try select(service)
        guard names.count == 1 else { throw CtlError.serviceNeeded(existing: names, root: root) }
        return names[0]
    }

    /// Reads services; with `sockets`, also asks the kernel about each slot's sockets
    /// (drops, listen address). Throws the first service that cannot be read.
    func read(_ names: [String], sockets: Bool = true) throws -> [ServiceSnapshot] {
        let outcome = readEach(names, sockets: sockets)
        if let failure = outcome.failures.first { throw failure }
        return outcome.snapshots
    }

    /// Reads what can be read: one service half pinned (a daemon starting or stopping it)
    /// must not hide the others.
    func readEach(_ names: [String], sockets: Bool = true) -> (snapshots: [ServiceSnapshot], failures: [CtlError]) {
        var snapshots: [ServiceSnapshot] = []
        var failures: [CtlError] = []
        for name in names {
            do {
                snapshots.append(try read(name))
            } catch {
                failures.append(error as? CtlError ?? .kernel(error))
            }
        }
        return (attachingSockets(snapshots, sockets: sockets), failures)
    }

    private func attachingSockets(_ snapshots: [ServiceSnapshot], sockets: Bool) -> [ServiceSnapshot] {
        var snapshots = snapshots
        guard sockets else { return snapshots }
        let cookies = snapshots.flatMap { $0.listeners.flatMap { $0.cookies.values } }
        guard !cookies.isEmpty else { return snapshots }
        let diagnoses: [UInt64: SocketDiagnosis]
        do {
            diagnoses = try SocketDiagnostics.sockets(Set(Transport.allCases))
        } catch {
            for index in snapshots.indices { snapshots[index].diagnosticsProblem = "\(error)" }
            return snapshots
        }
        for index in snapshots.indices { attach(diagnoses, to: &snapshots[index]) }
        return snapshots
    }

    private func attach(_ diagnoses: [UInt64: SocketDiagnosis], to snapshot: inout ServiceSnapshot) {
        for index in snapshot.listeners.indices {
            let listener = snapshot.listeners[index]
            let known = listener.cookies.keys.sorted().compactMap { diagnoses[listener.cookies[$0]!] }
            if let socket = known.first {
                snapshot.listeners[index].endpoint = Endpoint(socket.transport, socket.local)
                snapshot.listeners[index].dualStack = socket.v6Only.map { !$0 }
            }
        }
        for index in snapshot.slots.indices {
            for socket in snapshot.slots[index].sockets.indices {
                let cookie = snapshot.slots[index].sockets[socket].cookie
                snapshot.slots[index].sockets[socket].diagnosis = diagnoses[cookie]
            }
        }
    }

    private func read(_ name: String) throws -> ServiceSnapshot {
        try open(name).snapshot()
    }

    /// Opens one service's pinned maps; the result reads them again without the pins. Read-only
    /// (BPF_F_RDONLY): reuseportctl never writes a map, and `serve-metrics` keeps these fds in
    /// the process that drops root and parses HTTP. A writable fd there would let whoever takes
    /// over that process rewrite the bucket table or put a socket of its own in a slot; through
    /// these the kernel refuses every write (EPERM).
    func open(_ name: String) throws -> OpenedService {
        let layout = PinLayout(root: root, service: name)
        do {
            // Records of a version this build does not know could be misread (same sizes, other
            // meanings); those of an older one it migrates read as they are (version 1's layouts).
            _ = try ServiceRecords.Version.checked(at: layout)
            let maps = try DispatchMaps(pinned: layout, readOnly: true)
            let arrays = try layout.listeners().map {
                (index: $0, array: try SocketArray(pinned: layout, listener: $0, readOnly: true))
            }
            return OpenedService(name: name, layout: layout, maps: maps, arrays: arrays)
        } catch {
            throw CtlError.unreadablePins(service: name, directory: layout.serviceDirectory, underlying: error)
        }
    }

    /// Snapshots of services opened earlier (through their fds: the pins need not be reachable
    /// any more, as after `serve-metrics` dropped root), with their sockets' drops.
    func snapshots(of services: [OpenedService]) -> (snapshots: [ServiceSnapshot], failures: [CtlError]) {
        var snapshots: [ServiceSnapshot] = []
        var failures: [CtlError] = []
        for service in services {
            do {
                snapshots.append(try service.snapshot())
            } catch {
                failures.append(error as? CtlError ?? .kernel(error))
            }
        }
        return (attachingSockets(snapshots, sockets: true), failures)
    }
}

/// One service's maps, open: a snapshot reads them through these fds, not through the pins.
/// The listeners are those pinned when it was opened.
struct OpenedService {
    var name: String
    var layout: PinLayout
    var maps: DispatchMaps
    var arrays: [(index: Int, array: SocketArray)]

    func snapshot() throws -> ServiceSnapshot {
        do {
            // The change's record first, the tables it describes after: the daemon writes a
            // switch's buckets, fallback and configuration before the record that says it
            // switched, so tables read after a record are at least as new as it says. Read the
            // other way round, a wait for the switch could see it in the record and still hold the
            // buckets from before (`scale` then reported "0 of 4096 buckets moved").
            let change = try maps.readTransition()
            let config = try maps.readConfig()
            if config.abi_version != 0 { try maps.checkConfiguredABI() }
            // The program reads no entry of a bucket_count it refuses (0, above RP_MAX_BUCKETS); the map has
            // no more than RP_MAX_BUCKETS entries, and a count up to 2^32 - 1 would take hours to read.
            let values = config.abi_version == 0 || !BucketCount.range.contains(Int(config.bucket_count))
                ? [] : try maps.readBucketValues(count: Int(config.bucket_count))
            let buckets = values.map { rp_bucket_slot($0) }
            let fallback = config.abi_version == 0 ? [] : try maps.readFallback()
            var listeners: [ServiceSnapshot.Listener] = []
            for (index, array) in arrays {
                var cookies: [UInt32: UInt64] = [:]
                for slot in 0..<UInt32(RP_MAX_SLOTS) {
                    if let cookie = try array.cookie(at: slot) { cookies[slot] = cookie }
                }
                listeners.append(.init(index: index, endpoint: nil, cookies: cookies))
            }
            var perSlot = [Int](repeating: 0, count: Int(RP_MAX_SLOTS))
            for slot in buckets where slot < UInt32(RP_MAX_SLOTS) { perSlot[Int(slot)] += 1 }
            // Every configured slot, and any other that has a worker, a socket or buckets (a
            // slot being removed by a scale-down, or a daemon that lost track of one). Once the
            // daemon records generations, the configured slots need not be 0..<slot_count (after
            // an upgrade they are the new generation's): a blank row (no generation, worker, socket
            // or bucket) is then a slot the service does not have, such as one an upgrade retired.
            var slots: [ServiceSnapshot.Slot] = []
            for slot in 0..<UInt32(RP_MAX_SLOTS) {
                let state = try maps.readSlotState(slot)
                let sockets = listeners.compactMap { listener in
                    listener.cookies[slot].map { ServiceSnapshot.SlotSocket(listener: listener.index, cookie: $0) }
                }
                let configured = slot < config.slot_count && (change.working_generation == 0 || state.generation != 0)
                let shown = configured || state.state != WorkerState.empty.rawValue || state.pid != 0
                    || !sockets.isEmpty || perSlot[Int(slot)] > 0
                guard shown else { continue }
                slots.append(.init(index: slot, state: state, counters: try maps.slotCounters(slot),
                                   quic: try maps.quicSlotCounters(slot), buckets: perSlot[Int(slot)],
                                   sockets: sockets))
            }
            var snapshot = ServiceSnapshot(name: name, directory: layout.serviceDirectory, config: config, buckets: buckets,
                                           fallback: fallback, listeners: listeners, slots: slots,
                                           global: try maps.globalCounters(), quic: try maps.readQuicSteering(),
                                           quicCounters: try maps.quicCounters())
            snapshot.transition = change
            snapshot.flows = try maps.flowCounters()
            snapshot.trackedCapacity = maps.flows.maxEntries
            snapshot.records = try FlowRecords.count(maps)
            snapshot.learningBuckets = values.filter { $0 & UInt32(RP_BUCKET_LEARN) != 0 }.count
            snapshot.pinnedBuckets = values.filter { $0 & UInt32(RP_BUCKET_PINNED) != 0 }.count
            // Through the pins (not kept open: read only while a canary runs); none when they
            // cannot be reached, as after `serve-metrics` dropped root.
            snapshot.canary = try? CanaryRecords.pinned(at: layout, bucketCount: Int(config.bucket_count))
            return snapshot
        } catch {
            throw CtlError.unreadablePins(service: name, directory: layout.serviceDirectory, underlying: error)
        }
    }
}

/// CLOCK_REALTIME in nanoseconds, as rp_slot_state.since_ns is written. The environment
/// variable REUSEPORTCTL_NOW_NS fixes it, so tests can compare output exactly.
func realtimeNanoseconds() -> UInt64 {
    if let fixed = getenv("REUSEPORTCTL_NOW_NS"), let value = UInt64(String(cString: fixed)) { return value }
    return WallClock.nanoseconds()
}
