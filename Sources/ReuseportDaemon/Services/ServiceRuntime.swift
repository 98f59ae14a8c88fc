#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Logging
import ReuseportControl
import ReuseportKit

/// What the supervisor knows about one slot: its worker, the restart back-off and
/// whether its buckets are failed over.
final class SlotRecord {
    let index: UInt32
    /// The cookie of the slot's socket on the first listener (published for reuseportctl).
    let socketCookie: UInt64
    var pid: pid_t?
    var state: WorkerState = .empty
    var sinceNs: UInt64 = WallClock.nanoseconds()
    /// Worker starts after the first.
    var restarts: UInt32 = 0
    var everStarted = false
    /// Its worker's lifecycle: start, down, quick exits, next start (SlotLifecycle: the restart
    /// decisions are its pure functions).
    var lifecycle = SlotLifecycle()
    /// Exits in a row of workers that did not live `healthyAfterMs`.
    var quickExits: Int {
        get { lifecycle.quickExits }
        set { lifecycle.quickExits = newValue }
    }
    /// Monotonic start time of the current worker.
    var startedAt: Int64? {
        get { lifecycle.startedAt }
        set { lifecycle.startedAt = newValue }
    }
    /// The current worker's start time in clock ticks after boot (/proc/<pid>/stat), published
    /// with its pid so that a later daemon can tell it from a process that reused the pid.
    var startTime: UInt64 = 0
    /// Since when the slot has had no ready worker (nil while one is ready).
    var downSince: Int64? {
        get { lifecycle.downSince }
        set { lifecycle.downSince = newValue }
    }
    /// In back-off: when to start the next worker.
    var nextStartAt: Int64? {
        get { lifecycle.nextStartAt }
        set { lifecycle.nextStartAt = newValue }
    }
    /// When the current worker's watchdog expires (`watchdog_ms` after its start or its last
    /// `WATCHDOG=1`); nil without a watchdog, or once it fired.
    var watchdogDeadline: Int64? {
        get { lifecycle.watchdogDeadline }
        set { lifecycle.watchdogDeadline = newValue }
    }
    /// Workers stopped for missing their watchdog.
    var watchdogRestarts: UInt32 = 0
    /// The current worker sent `READY=1`; its last `STATUS=`.
    var notifiedReady = false
    var notifiedStatus: String?
    /// Times the slot was marked stalled, and what the stall check saw last (SlotStallCheck).
    var stalls: UInt32 = 0
    var stallSamples = StallSamples()
    /// Packets steered to the slot (rp_slot_stats) and datagrams the kernel dropped at its UDP
    /// sockets (sock_diag), read together at the last stall check: a canary's bake compares them.
    var traffic: SlotTraffic?
    /// Live flow records naming the slot at the last sweep of a placement change.
    var records = 0
    /// The generation whose worker definition the slot runs.
    let generation: UInt32
    /// When the current worker became ready (CLOCK_REALTIME), for status.
    var readySinceNs: UInt64?

    init(index: UInt32, socketCookie: UInt64, generation: UInt32) {
        self.index = index
        self.socketCookie = socketCookie
        self.generation = generation
    }
}

/// One running service: its data plane (sockets, program, maps, pins) and its slots.
/// The supervision decisions live in `Daemon`; this type hands them to the data plane,
/// the only writer of the service's maps (bucket tables, rp_slot_state).
final class ServiceRuntime {
    private(set) var configuration: ServiceConfiguration
    let plane: ServiceDataPlane
    let pins: PinLayout
    /// Whether `pins` are this runtime's (a staged one's are pinned only once it took over).
    private(set) var pinned = false
    /// Whether the maps are the ones a previous daemon pinned here (taken over with its workers):
    /// their pins are replaced by the same maps, which is not removing stale pins.
    private var tookOverPins = false
    var slots: [SlotRecord]
    /// How many times a slot of this service has been failed over.
    private(set) var failovers = 0
    /// Datagrams that were still queued at a removed slot's socket when its drain ended (the
    /// worker died, or `stop_timeout_ms` passed): read and discarded by the daemon, unanswered.
    var removedSlotDrops = 0
    /// Workers started at once instead of after their back-off, because every other slot of the
    /// service was down, and when a worker last became ready (SlotLifecycle.afterExit).
    var rescue = RescueBudget()
    var rescueStarts: Int { rescue.starts }
    /// Live recorded flows of leaving slots that retired at the drain timeout (they moved).
    var flowsMovedAtDeadline = 0
    /// What was found of a previous daemon's workers (WorkerAdoption), until the supervisor
    /// takes them over (`takeAdoption`).
    private var adoption: WorkerAdoption?
    /// The configured worker count, when it differs from the slots of the maps taken over: the
    /// supervisor scales to it once the adopted workers run.
    private(set) var workersAfterAdoption: Int?
    /// Workers taken over from a previous daemon, and processes its rows named that were not.
    var adoptedWorkers = 0
    var refusedAdoptions = 0
    /// When a worker of this service last became ready: proof that its program can start.
    var lastReadyAt: Int64? {
        get { rescue.lastReadyAt }
        set { rescue.lastReadyAt = newValue }
    }
    /// What each generation with a slot runs; the working generation's is `configuration`'s.
    var definitions: [UInt32: WorkerDefinition] = [:]
    /// The upgrade in progress, or the last one (with how it ended).
    var upgrade: Upgrade?
    /// Upgrades started, switched and abandoned since the daemon started.
    var upgradeCounts = UpgradeCounts(started: 0, switched: 0, abandoned: 0)
    /// The service's rp_leaving map (the supervisor writes it; nil if it could not be made).
    let leavingRecords: LeavingRecords?
    /// The leaving workers a previous daemon pinned, until the supervisor takes them over.
    private var inheritedLeaving: [LeavingRecords.Record] = []
    /// The service's rp_canary and rp_canary_buckets (the supervisor writes them; nil if they could not be made).
    let canaryRecords: CanaryRecords?
    /// The canary a previous daemon pinned, resumed by the plane, until the supervisor takes it over.
    private var inheritedCanary: PinnedCanary?
    let logger: Logger

    var name: String { configuration.name }

    /// Binds the sockets, loads and attaches the program and pins the maps. Refuses an address
    /// held by a reuseport group other than `ownGroups` (ListenerClaim).
    ///
    /// `staged` (on reload): the data plane is built beside what runs, make-before-break: its
    /// programs are not attached and its maps not pinned (a predecessor's pins are still
    /// there) until `takeOver(from:)` and `pinInPlace()`. With `predecessor` (the running
    /// runtime of the same service), a listener configured with port 0 as before keeps the
    /// port it got.
    ///
    /// `inherited`: this service's sockets the daemon's previous image handed over across its exec
    /// (InheritedSockets), by slot and listener; used where no adopted worker gave them back.
    /// `store`: at start, the sockets systemd kept for this service across a restart, which its
    /// slots reuse where neither gave them back (SocketStore.claim); their groups are the daemon's own.
    init(configuration: ServiceConfiguration, pinRoot: String, logger: Logger, ownGroups: Set<Endpoint> = [],
         staged: Bool = false, predecessor: ServiceRuntime? = nil,
         inherited: [UInt32: [Int: OwnedDescriptor]] = [:], store: SocketStore? = nil) throws {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: "service"] = "\(configuration.name)"
        self.logger = logger
        let options = ServiceDataPlane.Options(bucketCount: configuration.bucketCount, seed: configuration.seed,
                                               receiveBuffer: configuration.receiveBuffer,
                                               tracking: configuration.tracking, quic: configuration.quic)
        var endpoints = configuration.listen
        if let predecessor {
            for (index, endpoint) in endpoints.enumerated() where endpoint.address.port == 0 {
                if index < predecessor.configuration.listen.count, predecessor.configuration.listen[index] == endpoint {
                    endpoints[index] = predecessor.listeners[index]
                }
            }
        }
        pins = PinLayout(root: pinRoot, service: configuration.name)
        do {
            leavingRecords = try LeavingRecords()
        } catch {
            leavingRecords = nil
            logger.error("cannot make \(RP_MAP_LEAVING): a daemon started after this one will not know its leaving workers: \(error)")
        }
        do {
            canaryRecords = try CanaryRecords(bucketCount: configuration.bucketCount)
        } catch {
            canaryRecords = nil
            logger.error("cannot make \(RP_MAP_CANARY): a daemon started after this one will not resume a canary: \(error)")
        }
        if !staged {
            do {
                inheritedLeaving = try LeavingRecords.pinned(at: pins)
            } catch {
                logger.warning("the leaving workers pinned at \(pins.serviceDirectory) cannot be read (\(error)): they are not taken over")
            }
        }
        // The daemon's records among the pins (bpf/records.h) are versioned apart from the
        // program: of a version this daemon cannot read (a newer daemon's), the service does not
        // start, and the workers they name serve on, never signalled; of an older one it knows,
        // they are taken over once migrated (ServiceRecords.Version).
        var recordsVersion = ServiceRecords.Version.current
        if !staged, pins.exists {
            do {
                recordsVersion = try ServiceRecords.Version.checked(at: pins)
            } catch let error as ReuseportError {
                throw DaemonError.adoption("\(error): the workers they name are not taken over and serve on. Run the "
                    + "reuseportd that pinned them, or stop those workers and remove the pins to start afresh")
            }
        }
        // What a previous daemon left in the pins (it crashed, was killed, or exec'ed this one):
        // its running workers are adopted with their sockets, and a placement change it left is
        // finished, not dropped, so no flow moves.
        let resumed: Bool
        var pinned: DispatchMaps?
        var pinnedGenerations: (working: UInt32, last: UInt32)?
        var pinnedArrays: [SocketArray?] = []
        var existing: [UInt32: [ReuseportSocket]] = [:]
        var slotLimit = configuration.workers
        if !staged, let maps = ServiceDataPlane.resumable(at: pins, options: options),
           let change = try? maps.readTransition()
        {
            // Not 0..<slot_count: after an upgrade the working slots are the new generation's
            // (4..7, or 0, 1, 4..7 once scaled), and no worker the pins name may be missed.
            let limit = ServiceDataPlane.pinnedSlotBound(maps)
            // Opened once: the adopted and handed-over sockets are checked against them, and the
            // new programs use them.
            pinnedArrays = endpoints.indices.map { [pins] in try? SocketArray(pinned: pins, listener: $0) }
            let found = WorkerAdoption(maps: maps, arrays: pinnedArrays, endpoints: endpoints, slotLimit: limit)
            existing = found.sockets
            let handedOver = Self.check(inherited.filter { found.sockets[$0.key] == nil }, endpoints: endpoints,
                                        arrays: pinnedArrays, logger: logger)
            existing.merge(handedOver) { adopted, _ in adopted }
            if found.foundWorkers || !handedOver.isEmpty || change.phase != RP_TRANSITION_NONE.rawValue {
                pinned = maps
                adoption = found
                slotLimit = limit
                handedOverSlots = handedOver.count
            }
        }
        // The sockets systemd kept across a restart (SocketStore): each slot that has them keeps
        // them (an adopted worker's or a handed-over copy, of the same sockets, goes first).
        if !staged, let store {
            let stored: [UInt32: [ReuseportSocket]]
            (stored, endpoints) = store.claim(service: configuration.name, endpoints: endpoints, slots: slotLimit)
            existing.merge(stored) { adopted, _ in adopted }
        }
        // The previous daemon's workers (or sockets, or the store) hold these addresses: the groups
        // are this service's own.
        let held = Set(existing.values.joined().map(\.endpoint))
        for endpoint in endpoints where !ownGroups.contains(endpoint) && adoption?.foundWorkers != true
            && !held.contains(endpoint) {
            try ListenerClaim.checkFree(endpoint)
        }
        if let pinned, let adoption {
            if case .migrate(let old) = recordsVersion {
                logger.notice("the records pinned at \(pins.serviceDirectory) are of records version \(old): migrated to version \(RP_RECORDS_VERSION)")
            }
            resumed = true
            tookOverPins = true
            var canary: PinnedCanary?
            do {
                canary = try CanaryRecords.pinned(at: pins, bucketCount: configuration.bucketCount)
            } catch {
                logger.warning("the canary pinned at \(pins.serviceDirectory) cannot be read (\(error)): it is not resumed")
            }
            plane = try ServiceDataPlane(endpoints: endpoints, resuming: pinned, options: options,
                                         existing: existing,
                                         socketArrays: pinnedArrays, canary: canary)
            if let canary {
                if plane.model.canary?.generation == canary.generation {
                    inheritedCanary = canary
                } else {
                    logger.warning("generation \(canary.generation)'s canary, pinned at \(pins.serviceDirectory), does not match the pinned placement: not resumed; its slots leave and its buckets go back to generation \(plane.workingGeneration) once their live flows are recorded")
                }
            }
            // Slots that were failed over lent their buckets, and the pins keep the lent table:
            // their new workers get their share back as a change, which keeps the live flows.
            do {
                if let plan = try plane.rebalanceIfStarved(now: MonotonicClock.nanoseconds()) {
                    logger.notice("slots without their share of buckets (failed over before the restart): \(plan.movingBuckets) buckets come back once their live flows are recorded")
                }
            } catch {
                logger.error("cannot give starved slots their buckets back: \(error)")
            }
            let change = try plane.maps.readTransition()
            if change.phase != RP_TRANSITION_NONE.rawValue {
                self.configuration.workers = (plane.pending?.slots ?? plane.slots).count
                let records = try FlowRecords.count(plane.maps)
                logger.notice(
                    "resuming the placement change left in \(pins.serviceDirectory): phase \(change.phase), \(plane.liveSlots.count) slots, \(records) flow records, \(self.configuration.workers) workers after it")
                nextTransitionCheck = MonotonicClock.nanoseconds()
            } else {
                self.configuration.workers = plane.slots.count
                if configuration.workers != plane.slots.count { workersAfterAdoption = configuration.workers }
            }
            logger.notice(
                "taking over the maps left in \(pins.serviceDirectory): \(adoption.adopted.count) workers adopted with their sockets, \(adoption.unusable.count) to stop, \(adoption.refused.count) refused, \(adoption.gone.count) gone; \(handedOverSlots) more slots' sockets handed over")
        } else {
            resumed = false
            // Stored sockets are still in the previous daemon's arrays, which live as long as its
            // program is attached (or pinned), and a socket cannot enter a second array (EBUSY).
            // The previous daemon stored those arrays too: this plane's programs use them, with
            // every stored socket at its slot already, and replace the old programs in one step.
            // Without them (capacity, or a socket not where its array says), its pins go (once
            // their generations are read) and its programs are detached before the sockets enter
            // this plane's arrays; this plane's programs are attached only then, once the arrays
            // and tables are full. Meanwhile the kernel spreads datagrams over the group by its own
            // hash: none is dropped, but for those milliseconds one may reach another slot's socket.
            var arrays: [SocketArray]?
            if !existing.isEmpty, !staged, let stored = store?.claimArrays(service: configuration.name,
                                                                       listeners: endpoints.count) {
                let inPlace = existing.allSatisfy { slot, sockets in
                    sockets.indices.allSatisfy { (try? stored[$0].cookie(at: slot)) == (try? sockets[$0].cookie()) }
                }
                if inPlace {
                    arrays = stored
                } else {
                    logger.warning("fd store: the stored socket arrays do not hold the stored sockets at their slots: not used")
                }
            }
            let reusing = !existing.isEmpty && arrays == nil
            if reusing {
                if pins.exists {
                    pinnedGenerations = ServiceDataPlane.pinnedGenerations(at: pins)
                    logger.notice("removing the pins left at \(pins.serviceDirectory): their arrays hold the stored sockets")
                    pins.remove()
                }
                for listener in endpoints.indices {
                    try existing.values.lazy.compactMap { listener < $0.count ? $0[listener] : nil }.first?.detachProgram()
                }
            }
            // A rebuild carries the running plane's slots over (carryPlacement): its maps hold them.
            plane = try ServiceDataPlane(endpoints: endpoints, slotCount: configuration.workers, options: options,
                                         attach: !staged && existing.isEmpty, existing: existing,
                                         socketArrays: arrays ?? [], slotCapacity: predecessor?.plane.slotCapacity ?? 1)
            // Attached only now, with the tables written: a program attached to a group whose
            // sockets are in its arrays already would otherwise meet an unconfigured rp_config.
            if !existing.isEmpty && !staged { try plane.attachPrograms() }
            if arrays != nil {
                logger.notice("fd store: service \(configuration.name) took over its stored socket arrays: the programs switched in one step")
            }
        }
        slots = []
        // Generation numbers go on from those of the previous plane (a reload's predecessor, or
        // pins a previous daemon left): workers started from nothing form a new generation.
        if !resumed {
            let last = predecessor?.plane.lastGeneration
                ?? (staged ? nil : (pinnedGenerations ?? ServiceDataPlane.pinnedGenerations(at: pins))?.last)
            if let last { try plane.continueGenerations(working: last &+ 1, last: last &+ 1) }
        }
        definitions[plane.workingGeneration] = configuration.workerDefinition
        // A rebuild keeps where every flow goes: the running plane's slots, bucket table and the
        // change in progress with its records (ServiceDataPlane.carryPlacement). An even table
        // over 0..<workers would move most flows after a scale, and records left behind would
        // let the change's flows move too.
        if staged, let predecessor, try plane.carryPlacement(from: predecessor.plane, now: MonotonicClock.nanoseconds()) {
            carriedPlacement = true
            for generation in Set(plane.slotGenerations.values) where generation != plane.workingGeneration {
                definitions[generation] = predecessor.definitions[generation]
            }
            self.configuration.workers = (plane.pending?.slots ?? plane.slots).count
            if plane.transitionStartedNs != nil { nextTransitionCheck = MonotonicClock.nanoseconds() }
        }
        if !staged {
            do {
                try pinInPlace()
            } catch {
                plane.close()
                throw error
            }
        }
        for slot in plane.liveSlots { slots.append(try makeRecord(slot)) }
        for slot in slots { publish(slot) }
    }

    /// Switches the groups to this runtime's programs (staged, its workers started), from
    /// `predecessor`'s if there is one. If that fails, switches back to the predecessor's
    /// programs and throws, having changed nothing. The predecessor's workers, sockets and
    /// pins are the caller's to retire; then `pinInPlace()`.
    func takeOver(from predecessor: ServiceRuntime?) throws {
        // The predecessor's program recorded flows until now (a change learning): the last ones
        // are copied just before its groups switch to this plane's programs.
        if carriedPlacement, let predecessor {
            do {
                let left = try plane.copyRecords(from: predecessor.plane)
                if left > 0 { logger.warning("rebuild: \(left) flow records did not fit max_tracked_flows: their flows follow the table") }
            } catch {
                logger.warning("rebuild: the flow records made since the new data plane was built could not be copied: \(error)")
            }
        }
        do {
            try plane.attachPrograms()
        } catch {
            try? predecessor?.plane.attachPrograms()
            throw error
        }
    }

    /// Pins the maps at the service's folder (a staged runtime: once its predecessor's `close()`
    /// removed its pins). Pins found there belong to no running service: they are removed (a
    /// symbolic link planted there is removed itself, never followed: see `PinLayout.remove`).
    func pinInPlace() throws {
        if pins.exists {
            // Maps taken over (workers adopted, a change resumed) stay open here; only their names
            // are replaced.
            if !tookOverPins { logger.warning("removing stale pins left at \(pins.serviceDirectory)") }
            pins.remove()
        }
        do {
            try plane.pin(pins)
            pinned = true
            try leavingRecords?.pin(at: pins)
            try canaryRecords?.pin(at: pins)
        } catch {
            pins.remove()
            throw error
        }
    }

    /// The share of flows (on the first listener) that the steering of `other` puts on another
    /// slot than this runtime's, estimated from `samples` made-up flows (the hash gives no
    /// other way: the daemon keeps no table of flows). Nil when the first listeners differ.
    func movedShare(to other: ServiceRuntime, samples: Int = 4096) -> Double? {
        guard let destination = listeners.first, destination == other.listeners.first,
              let before = try? plane.snapshot(), let after = try? other.plane.snapshot()
        else { return nil }
        var moved = 0
        var state: UInt32 = 0x9e37_79b9
        for _ in 0..<samples {
            // xorshift32: spread sources over addresses and ports.
            state ^= state << 13
            state ^= state >> 17
            state ^= state << 5
            let source = destination.address.address.isV4
                ? SocketAddress(IPAddress(bytes: [10, UInt8(truncatingIfNeeded: state >> 24),
                                                  UInt8(truncatingIfNeeded: state >> 16), UInt8(truncatingIfNeeded: state >> 8)])!,
                                UInt16(truncatingIfNeeded: state) | 1024)
                : SocketAddress(IPAddress(bytes: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                  UInt8(truncatingIfNeeded: state >> 24), UInt8(truncatingIfNeeded: state >> 16),
                                                  UInt8(truncatingIfNeeded: state >> 8), 1])!,
                                UInt16(truncatingIfNeeded: state) | 1024)
            let flow = FlowTuple(destination.transport, from: source, to: destination.address)
            if before.placement(of: flow).slot != after.placement(of: flow).slot { moved += 1 }
        }
        return Double(moved) / Double(samples)
    }

    /// Built by a reload beside its predecessor, with the predecessor's placement (same bucket
    /// count and seed): `takeOver` copies the records made meanwhile.
    private(set) var carriedPlacement = false

    /// Slots whose sockets the daemon's previous image handed over (no adopted worker had them).
    private(set) var handedOverSlots = 0

    /// The handed-over sockets (`inherited`) that are this service's: for each slot, one per
    /// listener, each the socket this daemon makes for that listener (ReuseportSocket(adopting:))
    /// and the one the pinned array holds at the slot (same cookie). Others are logged and closed.
    private static func check(_ inherited: [UInt32: [Int: OwnedDescriptor]], endpoints: [Endpoint],
                              arrays: [SocketArray?], logger: Logger) -> [UInt32: [ReuseportSocket]] {
        var checked: [UInt32: [ReuseportSocket]] = [:]
        for (slot, byListener) in inherited {
            do {
                checked[slot] = try endpoints.indices.map { index in
                    guard let descriptor = byListener[index] else { throw DaemonError.adoption("no socket for listener \(index)") }
                    let socket = try ReuseportSocket(adopting: descriptor, expected: endpoints[index])
                    guard let cookie = try arrays[index]?.cookie(at: slot), try socket.cookie() == cookie else {
                        throw DaemonError.adoption("listener \(index)'s socket is not the one the pinned array holds at the slot")
                    }
                    return socket
                }
            } catch {
                logger.warning("slot \(slot): a handed-over socket is not used: \(error)")
            }
        }
        return checked
    }

    /// Hands what was found of a previous daemon's workers to the supervisor, once.
    /// The canary a previous daemon pinned, resumed by the plane, once (Supervisor.resumeCanary).
    func takeInheritedCanary() -> PinnedCanary? {
        defer { inheritedCanary = nil }
        return inheritedCanary
    }

    /// The leaving workers a previous daemon pinned, once (Supervisor.adoptLeaving).
    func takeInheritedLeaving() -> [LeavingRecords.Record] {
        defer { inheritedLeaving = [] }
        return inheritedLeaving
    }

    func takeAdoption() -> (WorkerAdoption, workersAfter: Int?)? {
        defer {
            adoption = nil
            workersAfterAdoption = nil
        }
        return adoption.map { ($0, workersAfterAdoption) }
    }

    func makeRecord(_ slot: UInt32) throws -> SlotRecord {
        SlotRecord(index: slot, socketCookie: try plane.sockets(ofSlot: slot).first?.cookie() ?? 0,
                   generation: plane.slotGenerations[slot] ?? plane.workingGeneration)
    }

    /// The configuration a slot's workers start with: the service's, running its generation's
    /// worker definition.
    func configuration(of slot: SlotRecord) -> ServiceConfiguration {
        var configuration = configuration
        if let definition = definitions[slot.generation] { configuration.workerDefinition = definition }
        return configuration
    }

    /// What the service runs from now on (an upgrade's, or the old one's again when it is
    /// abandoned): what a reload compares with, and what slots a scale adds run.
    func target(_ definition: WorkerDefinition, workers: Int) {
        configuration.workerDefinition = definition
        configuration.workers = workers
    }

    /// Whether the slot's workers say when they are ready (`notify = true` in their definition).
    /// Asked for every slot at every turn of the loop: no copy of the configuration.
    func notifies(_ slot: SlotRecord) -> Bool {
        definitions[slot.generation]?.notify ?? configuration.notify
    }

    /// Forgets the definitions no slot runs any more.
    func pruneDefinitions() {
        let running = Set(slots.map(\.generation)).union([plane.workingGeneration])
        definitions = definitions.filter { running.contains($0.key) }
    }

    /// The bound listeners (real ports when 0 was configured).
    var listeners: [Endpoint] { plane.listeners.map(\.endpoint) }

    func slot(_ index: UInt32) -> SlotRecord? { slots.first { $0.index == index } }

    /// Takes settings that need no new sockets (restart policy, failover limit); the worker
    /// definition changes only through an upgrade (`Supervisor.beginUpgrade`).
    func update(_ configuration: ServiceConfiguration) {
        var configuration = configuration
        configuration.workers = self.configuration.workers
        configuration.workerDefinition = self.configuration.workerDefinition
        self.configuration = configuration
        do {
            try plane.setTracking(configuration.tracking)
        } catch {
            logger.error("cannot apply the new flow-tracking settings: \(error)")
        }
    }

    /// Records a state change and publishes the slot's row in rp_slot_state.
    func setWorkerState(_ slot: SlotRecord, to state: WorkerState) {
        if slot.state != state {
            slot.state = state
            slot.sinceNs = WallClock.nanoseconds()
        }
        publish(slot)
    }

    func publish(_ slot: SlotRecord) {
        let row = rp_slot_state(pid: UInt32(slot.pid ?? 0), state: slot.state.rawValue, restarts: slot.restarts,
                                generation: slot.generation, since_ns: slot.sinceNs, socket_cookie: slot.socketCookie,
                                stalls: slot.stalls, watchdog_restarts: slot.watchdogRestarts,
                                records: UInt32(clamping: slot.records), flags: plane.model.rowFlags(of: slot.index),
                                start_time: slot.pid == nil ? 0 : slot.startTime)
        do {
            try plane.publish(row, slot: slot.index)
        } catch {
            logger.error("cannot publish the state of slot \(slot.index): \(error)")
        }
    }

    /// Logs the invariants of the placement that an operation broke since the last call
    /// (ServiceDataPlane.invariantViolations): a bug, said once, with what is wrong.
    func reportBrokenInvariants() {
        let count = plane.invariantViolationCount
        guard count > reportedViolations else { return }
        for broken in plane.invariantViolations.suffix(count - reportedViolations) {
            logger.error("placement invariant broken (a bug; please report it with `reuseportctl map dump`): \(broken)")
        }
        reportedViolations = count
    }

    private var reportedViolations = 0

    /// Whether the slot's buckets are lent to the live slots, or will be at the switch of the
    /// change being learned (a restore in progress is not: its slot is back at the switch).
    func isFailedOver(_ slot: SlotRecord) -> Bool { plane.model.isFailedOver(slot.index) }

    /// A slot a scale-down removes: from the switch on it takes no new flow; it retires once drained.
    func isLeaving(_ slot: SlotRecord) -> Bool { plane.model.isLeaving(slot.index) }

    /// A slot a scale-up added: it takes flows from the switch on.
    func isJoining(_ slot: SlotRecord) -> Bool { plane.model.isJoining(slot.index) }

    /// Lends the slot's buckets to the live slots (the data plane moves no other bucket).
    /// Returns how many moved, or nil when the table could not be written (logged).
    func failOver(_ slot: SlotRecord) -> Int? {
        do {
            let lent = try plane.failOver(slot.index)
            failovers += 1
            // Its recorded flows have no worker either: they follow the table from now on.
            if plane.transitionStartedNs != nil {
                try plane.forgetRecords(of: slot.index)
                nextTransitionCheck = MonotonicClock.nanoseconds()
            }
            return lent
        } catch {
            logger.error("cannot fail over slot \(slot.index): \(error)")
            return nil
        }
    }

    /// Gives a failed-over slot back exactly the buckets it lent: with flow tracking, as a change
    /// (the flows the others took over stay there; the slot takes new flows from the switch);
    /// without, at once. Returns how many buckets, or nil when the table could not be written
    /// (logged; the slot stays failed over).
    func restore(_ slot: SlotRecord, now: Int64) -> Int? {
        do {
            guard plane.tracksFlows else { return try plane.restore(slot.index) }
            return try plane.beginRestore(slot.index, now: now).movingBuckets
        } catch {
            logger.error("cannot restore slot \(slot.index)'s buckets: \(error)")
            return nil
        }
    }

    /// Starts a change to `count` slots (ServiceDataPlane.beginResize): new slots get sockets
    /// and records now, and take new flows from the switch on; slots beyond `count` take no new
    /// flow and retire once drained. `immediately` (or without flow tracking): switches at once,
    /// and the leaving slots retire at the next check. Returns the plan and the added slots.
    func beginResize(to count: Int, now: Int64, immediately: Bool) throws -> (plan: TransitionPlan, added: [SlotRecord]) {
        let plan = try plane.beginResize(to: count, now: now, learnNs: immediately ? 0 : nil)
        if immediately || !plane.tracksFlows { try plane.advance(now: now, force: true, drainNow: immediately) }
        var added: [SlotRecord] = []
        for index in plane.liveSlots where slot(index) == nil {
            let record = try makeRecord(index)
            slots.append(record)
            added.append(record)
        }
        slots.sort { $0.index < $1.index }
        for record in slots { publish(record) }
        configuration.workers = count
        return (plan, added)
    }

    /// What a change to `count` slots would do, without doing it: the buckets that move and the
    /// recorded flows on the slots that would leave.
    func planResize(to count: Int, now: Int64) throws -> TransitionPlan {
        let base = plane.pending
            ?? PendingPlacement(buckets: plane.buckets, slots: plane.slots, failed: plane.failedOver, switchNs: now)
        let target = Set(try plane.targetSlots(resizing: base.slots, to: count))
        let next = PendingPlacement(buckets: BucketAssignment.rebalance(base.buckets, to: target.sorted()),
                                    slots: target.sorted(), failed: base.failed.intersection(target), switchNs: now)
        let leaving = Set(plane.liveSlots).subtracting(target)
        let records = try plane.liveRecordsBySlot(now: now)
        return TransitionPlan(movingBuckets: BucketAssignment.moved(from: plane.effectiveBuckets, to: next.effective),
                              bucketCount: configuration.bucketCount, switchNs: now, leaving: leaving.sorted(),
                              recordedFlowsOnLeaving: leaving.reduce(0) { $0 + (records[$1] ?? 0) })
    }

    /// Takes a retiring slot out of the service: its sockets leave the arrays and come back open
    /// for the caller to drain; its record goes.
    func retire(_ slot: SlotRecord, now: Int64) throws -> [ReuseportSocket] {
        let sockets = try plane.retire(slot.index, now: now)
        slots.removeAll { $0 === slot }
        return sockets
    }

    /// Publishes a removed slot (retired, or an abandoned generation's) as a blank row: no worker,
    /// no generation, no flags. The slot is no longer the service's, so its row must not describe
    /// it as one (an old generation's label, "joining" since it is in no placement): a later
    /// daemon rebuilds the service's slots from these rows, and reuseportctl shows them.
    func clear(_ slot: SlotRecord) {
        slot.pid = nil
        slot.nextStartAt = nil
        slot.restarts = 0
        slot.state = .empty
        slot.sinceNs = WallClock.nanoseconds()
        do {
            try plane.publish(rp_slot_state(pid: 0, state: WorkerState.empty.rawValue, restarts: 0, generation: 0,
                                            since_ns: slot.sinceNs, socket_cookie: 0, stalls: 0, watchdog_restarts: 0,
                                            records: 0, flags: 0, start_time: 0), slot: slot.index)
        } catch {
            logger.error("cannot publish the state of slot \(slot.index): \(error)")
        }
    }

    /// When the change in progress is next checked (switch, sweep of the records); nil with none.
    var nextTransitionCheck: Int64?

    /// How often a change's records are swept: a quarter of the idle timeout, within 100 ms to 5 s.
    var sweepIntervalNs: Int64 {
        Int64(min(max(configuration.tracking.idleTimeoutMs / 4, 100), 5000)) * 1_000_000
    }

    /// Buckets per slot in the table as written.
    func bucketCounts() -> [UInt32: Int] {
        plane.effectiveBuckets.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }

    /// Closes every socket and removes the pins if they are this runtime's (unless `keepingPins`:
    /// a worker still holds the service's sockets, and a later daemon adopts it from them).
    /// Workers must be stopped by the caller.
    func close(keepingPins: Bool = false, leavingPort: Bool = false) {
        plane.close(leavingPort: leavingPort)
        if pinned && !keepingPins { pins.remove() }
        pinned = false
    }
}
