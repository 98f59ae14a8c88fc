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
    /// Its buckets point at live slots.
    var failedOver = false

    init(index: UInt32, socketCookie: UInt64) {
        self.index = index
        self.socketCookie = socketCookie
    }
}

/// One running service: its data plane (sockets, program, maps, pins) and its slots.
/// The supervision decisions live in `Daemon`; this type keeps the service's kernel
/// state (bucket table, rp_slot_state) in step with them.
final class ServiceRuntime {
    private(set) var configuration: ServiceConfiguration
    let plane: ServiceDataPlane
    let pins: PinLayout
    var slots: [SlotRecord]
    /// The table as written to rp_buckets: `plane.buckets` with failed-over slots' buckets
    /// spread over the live ones.
    private(set) var effectiveBuckets: [UInt32]
    /// How many times a slot of this service has been failed over.
    private(set) var failovers = 0
    let logger: Logger

    var name: String { configuration.name }

    /// Binds the sockets, loads and attaches the program and pins the maps. Refuses an address
    /// held by a reuseport group other than `ownGroups` (ListenerClaim).
    init(configuration: ServiceConfiguration, pinRoot: String, logger: Logger, ownGroups: Set<Endpoint> = []) throws {
        self.configuration = configuration
        var logger = logger
        logger[metadataKey: "service"] = "\(configuration.name)"
        self.logger = logger
        let options = ServiceDataPlane.Options(bucketCount: configuration.bucketCount, seed: configuration.seed,
                                               receiveBuffer: configuration.receiveBuffer)
        for endpoint in configuration.listen where !ownGroups.contains(endpoint) { try ListenerClaim.checkFree(endpoint) }
        plane = try ServiceDataPlane(endpoints: configuration.listen, slotCount: configuration.workers, options: options)
        pins = PinLayout(root: pinRoot, service: configuration.name)
        if access(pins.serviceDirectory, F_OK) == 0 {
            logger.warning("removing stale pins left at \(pins.serviceDirectory)")
            pins.remove()
        }
        do {
            try plane.pin(pins)
        } catch {
            plane.close()
            pins.remove()
            throw error
        }
        effectiveBuckets = plane.buckets
        slots = []
        for slot in plane.slots { slots.append(try makeRecord(slot)) }
        for slot in slots { publish(slot) }
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
                                generation: 0, since_ns: slot.sinceNs, socket_cookie: slot.socketCookie)
        do {
            try plane.maps.writeSlotState(slot.index, row)
        } catch {
            logger.error("cannot publish the state of slot \(slot.index): \(error)")
        }
    }

    /// Rewrites the bucket table: each failed-over slot's buckets go to live slots, every
    /// other bucket stays. Restoring writes back exactly the buckets that moved.
    /// `wholeTable`: write every entry, not only those that differ from `effectiveBuckets` (after a
    /// failed write, when the kernel's table is not known).
    func applyFailover(wholeTable: Bool = false) {
        let table = ServiceRuntime.failedOver(plane.buckets, slots: slots.map(\.index),
                                              failed: Set(slots.filter(\.failedOver).map(\.index)))
        do {
            try plane.maps.writeBuckets(table, previous: wholeTable ? nil : effectiveBuckets)
            effectiveBuckets = table
        } catch {
            logger.error("cannot write the bucket table: \(error)")
        }
    }

    /// `nominal` with the buckets of the `failed` slots spread over the other `slots` (none
    /// failed, or all: `nominal` as it is).
    static func failedOver(_ nominal: [UInt32], slots: [UInt32], failed: Set<UInt32>) -> [UInt32] {
        let live = slots.filter { !failed.contains($0) }
        return live.isEmpty || live.count == slots.count ? nominal : BucketAssignment.rebalance(nominal, to: live)
    }

    func noteFailover() { failovers += 1 }

    /// Changes the slot count, moving the fewest buckets. Returns the removed slots (their
    /// sockets are closed here; their workers are the caller's to stop, and then to mark
    /// empty with `clear`), the added ones and the number of buckets moved.
    func resize(to count: Int) throws -> (removed: [SlotRecord], added: [SlotRecord], moved: Int) {
        // The failover is laid over the new table as the plane writes it: a failed-over slot never
        // gets its buckets back, not even between two writes (slots added now are live). If the
        // resize fails, the plane has written back the table it found; lay the failover again anyway.
        let failed = Set(slots.filter(\.failedOver).map(\.index))
        let target = Array(0..<UInt32(count))
        let moved: Int
        do {
            moved = try plane.resize(to: count, written: { ServiceRuntime.failedOver($0, slots: target, failed: failed) },
                                     current: effectiveBuckets)
        } catch {
            applyFailover(wholeTable: true)
            throw error
        }
        effectiveBuckets = ServiceRuntime.failedOver(plane.buckets, slots: target, failed: failed)
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
        applyFailover()
        return (removed, added, moved)
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
        effectiveBuckets.reduce(into: [:]) { $0[$1, default: 0] += 1 }
    }

    /// Closes every socket and removes the pins. Workers must be stopped by the caller.
    func close() {
        plane.close()
        pins.remove()
    }
}
