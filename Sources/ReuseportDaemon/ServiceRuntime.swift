#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Logging
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
    /// Exits in a row of workers that did not live `healthyAfterMs`.
    var quickExits = 0
    /// Monotonic start time of the current worker.
    var startedAt: Int64?
    /// Since when the slot has had no ready worker (nil while one is ready).
    var downSince: Int64?
    /// In back-off: when to start the next worker.
    var nextStartAt: Int64?
    /// When the current worker's watchdog expires (`watchdog_ms` after its start or its last
    /// `WATCHDOG=1`); nil without a watchdog, or once it fired.
    var watchdogDeadline: Int64?
    /// Workers stopped for missing their watchdog.
    var watchdogRestarts: UInt32 = 0
    /// The current worker sent `READY=1`; its last `STATUS=`.
    var notifiedReady = false
    var notifiedStatus: String?
    /// Times the slot was marked stalled, and what the stall check saw last (SlotStallCheck).
    var stalls: UInt32 = 0
    var stallSamples = StallSamples()

    init(index: UInt32, socketCookie: UInt64) {
        self.index = index
        self.socketCookie = socketCookie
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
    var slots: [SlotRecord]
    /// How many times a slot of this service has been failed over.
    private(set) var failovers = 0
    /// Datagrams that were still queued at a removed slot's socket when its drain ended (the
    /// worker died, or `stop_timeout_ms` passed): read and discarded by the daemon, unanswered.
    var removedSlotDrops = 0
    /// Workers started at once instead of after their back-off, because every other slot of the
    /// service was down (Supervisor.scheduleRestart).
    var rescueStarts = 0
    /// When a worker of this service last became ready: proof that its program can start.
    var lastReadyAt: Int64?
    /// When a rescue start last happened: each needs a worker to have become ready since.
    var lastRescueAt: Int64?
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
    init(configuration: ServiceConfiguration, pinRoot: String, logger: Logger, ownGroups: Set<Endpoint> = [],
         staged: Bool = false, predecessor: ServiceRuntime? = nil) throws {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: "service"] = "\(configuration.name)"
        self.logger = logger
        let options = ServiceDataPlane.Options(bucketCount: configuration.bucketCount, seed: configuration.seed,
                                               receiveBuffer: configuration.receiveBuffer, quic: configuration.quic)
        var endpoints = configuration.listen
        if let predecessor {
            for (index, endpoint) in endpoints.enumerated() where endpoint.address.port == 0 {
                if index < predecessor.configuration.listen.count, predecessor.configuration.listen[index] == endpoint {
                    endpoints[index] = predecessor.listeners[index]
                }
            }
        }
        for endpoint in endpoints where !ownGroups.contains(endpoint) { try ListenerClaim.checkFree(endpoint) }
        plane = try ServiceDataPlane(endpoints: endpoints, slotCount: configuration.workers, options: options,
                                     attach: !staged)
        pins = PinLayout(root: pinRoot, service: configuration.name)
        slots = []
        if !staged {
            do {
                try pinInPlace()
            } catch {
                plane.close()
                throw error
            }
        }
        for slot in plane.slots { slots.append(try makeRecord(slot)) }
        for slot in slots { publish(slot) }
    }

    /// Switches the groups to this runtime's programs (staged, its workers started), from
    /// `predecessor`'s if there is one. If that fails, switches back to the predecessor's
    /// programs and throws, having changed nothing. The predecessor's workers, sockets and
    /// pins are the caller's to retire; then `pinInPlace()`.
    func takeOver(from predecessor: ServiceRuntime?) throws {
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
            logger.warning("removing stale pins left at \(pins.serviceDirectory)")
            pins.remove()
        }
        do {
            try plane.pin(pins)
            pinned = true
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

    private func makeRecord(_ slot: UInt32) throws -> SlotRecord {
        SlotRecord(index: slot, socketCookie: try plane.sockets(ofSlot: slot).first?.cookie() ?? 0)
    }

    /// The bound listeners (real ports when 0 was configured).
    var listeners: [Endpoint] { plane.listeners.map(\.endpoint) }

    func slot(_ index: UInt32) -> SlotRecord? { slots.first { $0.index == index } }

    /// Takes settings that need no new sockets (restart policy, failover limit, program).
    func update(_ configuration: ServiceConfiguration) {
        var configuration = configuration
        configuration.workers = self.configuration.workers
        self.configuration = configuration
    }

    /// Records a state change and publishes the slot's row in rp_slot_state.
    func transition(_ slot: SlotRecord, to state: WorkerState) {
        if slot.state != state {
            slot.state = state
            slot.sinceNs = WallClock.nanoseconds()
        }
        publish(slot)
    }

    func publish(_ slot: SlotRecord) {
        let row = rp_slot_state(pid: UInt32(slot.pid ?? 0), state: slot.state.rawValue, restarts: slot.restarts,
                                generation: 0, since_ns: slot.sinceNs, socket_cookie: slot.socketCookie,
                                stalls: slot.stalls, watchdog_restarts: slot.watchdogRestarts)
        do {
            try plane.publish(row, slot: slot.index)
        } catch {
            logger.error("cannot publish the state of slot \(slot.index): \(error)")
        }
    }

    /// Whether the data plane has the slot's buckets lent to the live slots.
    func isFailedOver(_ slot: SlotRecord) -> Bool { plane.failedOver.contains(slot.index) }

    /// Lends the slot's buckets to the live slots (the data plane moves no other bucket).
    /// Returns how many moved, or nil when the table could not be written (logged).
    func failOver(_ slot: SlotRecord) -> Int? {
        do {
            let lent = try plane.failOver(slot.index)
            failovers += 1
            return lent
        } catch {
            logger.error("cannot fail over slot \(slot.index): \(error)")
            return nil
        }
    }

    /// Gives a failed-over slot back exactly the buckets it lent. Returns how many, or nil when
    /// the table could not be written (logged; the slot stays failed over).
    func restore(_ slot: SlotRecord) -> Int? {
        do {
            return try plane.restore(slot.index)
        } catch {
            logger.error("cannot restore slot \(slot.index)'s buckets: \(error)")
            return nil
        }
    }

    /// Changes the slot count, moving the fewest buckets (a failed-over slot stays so). Returns
    /// the removed slots with their sockets (out of the arrays, no bucket names them, still open:
    /// the caller drains and closes them, stops their workers and marks them empty with `clear`),
    /// the added ones and the number of buckets moved.
    func resize(to count: Int) throws
        -> (removed: [(slot: SlotRecord, sockets: [ReuseportSocket])], added: [SlotRecord], moved: Int)
    {
        let (moved, sockets) = try plane.resizeKeepingRemoved(to: count)
        let removed = slots.filter { $0.index >= UInt32(count) }
        slots.removeAll { $0.index >= UInt32(count) }
        var added: [SlotRecord] = []
        for index in plane.slots where slot(index) == nil {
            let record = try makeRecord(index)
            slots.append(record)
            added.append(record)
        }
        for record in added { publish(record) }
        configuration.workers = count
        return (removed.map { ($0, sockets[$0.index] ?? []) }, added, moved)
    }

    /// Publishes a removed slot as empty.
    func clear(_ slot: SlotRecord) {
        slot.pid = nil
        slot.nextStartAt = nil
        slot.restarts = 0
        transition(slot, to: .empty)
    }

    /// Buckets per slot in the table as written.
    func bucketCounts() -> [UInt32: Int] {
        plane.effectiveBuckets.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }

    /// Closes every socket and removes the pins if they are this runtime's. Workers must be
    /// stopped by the caller.
    func close() {
        plane.close()
        if pinned { pins.remove() }
        pinned = false
    }
}
