#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// The steering data plane of one service: for each listener a reuseport group of one
/// socket per slot, its program attached, the socket array filled; one bucket table, one
/// fallback table and one configuration for all listeners.
///
/// It owns the sockets: a slot's socket outlives any worker that serves it, which is
/// what lets a replacement worker take over the same socket (and the datagrams queued
/// in it) without moving a single flow.
///
/// It is the only writer of the service's maps (rp_config, rp_buckets, rp_fallback, the
/// socket arrays, rp_slot_state, rp_transition, rp_next_buckets), and it
/// decides nothing: what they must say is its `model` (PlacementModel), whose operations return
/// the writes this type carries out, in their order (`run`). So no write ever puts a table in
/// the kernel that the model does not know.
public final class ServiceDataPlane: @unchecked Sendable {
    public struct Options: Sendable {
        public var bucketCount: Int
        public var seed: UInt32
        public var receiveBuffer: Int?
        public var v6Only: Bool
        public var tracking: FlowTracking
        /// QUIC connection-ID steering (rp_config.quic); nil: off.
        public var quic: QuicSteering?

        public init(bucketCount: Int = Int(RP_DEFAULT_BUCKETS), seed: UInt32 = 0, receiveBuffer: Int? = nil,
                    v6Only: Bool = true, tracking: FlowTracking = FlowTracking(), quic: QuicSteering? = nil) {
            self.bucketCount = bucketCount
            self.seed = seed
            self.receiveBuffer = receiveBuffer
            self.v6Only = v6Only
            self.tracking = tracking
            self.quic = quic
        }
    }

    /// How placement changes keep live UDP flows where they are (Transition.swift).
    public struct FlowTracking: Sendable, Equatable, Codable {
        /// Off: every change applies at once, as without records.
        public var enabled: Bool
        /// A flow is live while it has sent within this; a change learns for this long.
        public var idleTimeoutMs: Int
        /// rp_flows' capacity; nil: `TrackedFlowCount.sized(workers:)` for the workers the service
        /// is built with (its data plane resolves it: the plane's `options` always name one).
        public var maxFlows: Int?
        /// New records per second for the whole service: nil (the default) spreads `maxFlows` over
        /// one learning window plus the one second of credit the token bucket starts with (at
        /// least 1 a second), so that new tuples sprayed while a change learns cannot fill the
        /// table before the window ends; 0: no bound.
        public var recordsPerSecond: Int?
        /// Leaving slots retire at most this long after the switch, live records or not (0: never).
        public var drainTimeoutMs: Int

        public init(enabled: Bool = true, idleTimeoutMs: Int = 60_000, maxFlows: Int? = nil,
                    recordsPerSecond: Int? = nil, drainTimeoutMs: Int = 3_600_000) {
            self.enabled = enabled
            self.idleTimeoutMs = idleTimeoutMs
            self.maxFlows = maxFlows
            self.recordsPerSecond = recordsPerSecond
            self.drainTimeoutMs = drainTimeoutMs
        }

        /// The bound in force: `recordsPerSecond`, or by default `maxFlows` over one idle timeout
        /// and one second. The bucket holds at most one second of credit and starts full
        /// (bpf/dispatch.bpf.c, take_record_credit), so a window of W seconds records at most
        /// rate × (W + 1): with this rate, never more than `maxFlows`. No floor but 1 a second: a
        /// floor above `maxFlows / (W + 1)` would let a spray fill the table early.
        public var effectiveRecordsPerSecond: Int {
            if let recordsPerSecond { return recordsPerSecond }
            let window = Swift.max(idleTimeoutMs, 1) + 1000
            return Swift.max(1, (maxFlows ?? Int(RP_DEFAULT_TRACKED_FLOWS)) * 1000 / window)
        }

        /// rp_config.record_cost_ns: the credit one record costs in the service's token bucket.
        var recordCostNs: UInt32 {
            let rate = effectiveRecordsPerSecond
            guard rate > 0 else { return 0 }
            return UInt32(clamping: Swift.max(1, 1_000_000_000 / rate))
        }
    }

    public final class Listener: @unchecked Sendable {
        /// The bound endpoint (the real port when 0 was asked).
        public let endpoint: Endpoint
        public let program: DispatchProgram
        public fileprivate(set) var sockets: [UInt32: ReuseportSocket] = [:]

        init(endpoint: Endpoint, program: DispatchProgram) {
            self.endpoint = endpoint
            self.program = program
        }
    }

    /// The options the plane was made with; `tracking` is the model's (a change runs with the
    /// settings it started with).
    public var options: Options {
        var options = settings
        options.tracking = model.tracking
        return options
    }

    private let settings: Options
    /// The service's maps, for reading (counters, tables, state). Only this type writes them.
    public let maps: DispatchMaps
    public let listeners: [Listener]
    /// What the maps say, as a value: every decision is made there (PlacementModel); this type
    /// carries its writes out (`apply`).
    public private(set) var model: PlacementModel
    /// Invariants of the placement found broken after an operation (PlacementModel.violations),
    /// the last few, for status and the tests: always empty unless there is a bug.
    public private(set) var invariantViolations: [String] = []
    public private(set) var invariantViolationCount = 0

    /// Slot indices in the set.
    public var slots: [UInt32] { model.slots }
    /// The nominal bucket table: where each bucket's flows belong.
    public var buckets: [UInt32] { model.buckets }
    /// Slots whose buckets are failed over: spread over the other slots in rp_buckets.
    public var failedOver: Set<UInt32> { model.failedOver }
    /// The table rp_buckets holds, without flags.
    public var effectiveBuckets: [UInt32] { model.effectiveBuckets }
    /// The table rp_fallback holds.
    public var fallback: [UInt32] { model.fallback }
    /// Each bucket's part in a placement change (RP_BUCKET_LEARN, RP_BUCKET_PINNED).
    public var bucketFlags: [UInt32] { model.bucketFlags }
    /// The change being learned: what the switch will write.
    public var pending: PendingPlacement? { model.pending }
    /// Slots that hold sockets but are no longer in `slots`: their recorded flows still go there.
    public var leaving: Set<UInt32> { model.leaving }
    /// When the leaving slots retire, records or not (CLOCK_MONOTONIC).
    public var drainDeadlineNs: Int64? { model.drainDeadlineNs }
    /// When the current change started, for status (CLOCK_MONOTONIC).
    public var transitionStartedNs: Int64? { model.transitionStartedNs }
    /// The generation taking new flows, and the last number given out (kept in rp_transition).
    public var workingGeneration: UInt32 { model.workingGeneration }
    public var lastGeneration: UInt32 { model.lastGeneration }
    /// The generation of each slot holding a socket.
    public var slotGenerations: [UInt32: UInt32] { model.slotGenerations }
    /// A generation whose slots hold sockets but take no flow yet: its workers are starting.
    public var startingGeneration: StartingGeneration? { model.startingGeneration }
    /// The generation the pending change makes the working one at its switch.
    public var pendingGeneration: UInt32? { model.pendingGeneration }
    /// Whether changes of this plane learn and pin flows.
    public var tracksFlows: Bool { model.tracksFlows }

    /// Binds `slotCount` sockets on each endpoint, loads and attaches the program, fills the
    /// arrays and writes the configuration, an even bucket table and the fallback table.
    ///
    /// With `attach` false the programs are loaded and their arrays filled but not attached:
    /// `attachPrograms()` does that later. This is how a service is rebuilt make-before-break
    /// on an address it already holds: the new sockets join the running reuseport group (one
    /// (protocol, address, port) is one group; net/core/sock_reuseport.c, reuseport_add_sock())
    /// and get no traffic while the group's program, which selects only from its own array,
    /// is the old one.
    ///
    /// `existing`: sockets an earlier run of the daemon made, by slot, in listener order
    /// (`ReuseportSocket(adopting:expected:)` checked them); those slots keep them, so their
    /// flows and what is queued in them stay, and only the other slots get new sockets.
    ///
    /// `socketArrays`: each listener's previous socket array (kept in systemd's fd store), which
    /// the new program uses as its own: the `existing` sockets are in it already, so attaching
    /// the new program replaces the old one in the group in one step (see the other initializer).
    ///
    /// `slotCapacity`: at least this many slots in the slot-indexed maps (a rebuild passes the
    /// running plane's, so its placement fits); they hold `SlotCapacity.sized(workers: slotCount)`,
    /// or more where the `existing` sockets or `socketArrays` need it.
    public init(endpoints: [Endpoint], slotCount: Int, options: Options = Options(), attach: Bool = true,
                existing: [UInt32: [ReuseportSocket]] = [:], socketArrays: [SocketArray?] = [],
                slotCapacity: Int = 1) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        var options = options
        options.tracking.maxFlows = options.tracking.maxFlows ?? TrackedFlowCount.sized(workers: slotCount).value
        let adopted = socketArrays.compactMap { $0.map { Int($0.map.maxEntries) } }
        var wanted = max(SlotCapacity.sized(workers: slotCount).value, slotCapacity, adopted.max() ?? 0)
        while wanted < (existing.keys.max().map { Int($0) + 1 } ?? 0) { wanted *= 2 }
        wanted = min(wanted, Int(RP_MAX_SLOTS))
        model = try PlacementModel(bucketCount: options.bucketCount, slotCount: slotCount, tracking: options.tracking,
                                   hasUDP: endpoints.contains { $0.transport == .udp })
        settings = options
        var listeners: [Listener] = []
        var shared: DispatchMaps?
        for (index, requested) in endpoints.enumerated() {
            let program = try DispatchProgram(sharing: shared, trackedFlows: options.tracking.maxFlows!,
                                              bucketCount: options.bucketCount, slotCapacity: try SlotCapacity(wanted).value,
                                              socketArray: index < socketArrays.count ? socketArrays[index] : nil)
            shared = shared ?? program.maps
            listeners.append(try Self.listener(requested, index: index, program: program, existing: existing,
                                               options: options, attach: attach))
        }
        self.maps = shared!
        self.listeners = listeners
        model.slotCapacity = Self.slotCapacity(maps: maps, listeners: listeners)
        try apply(model.initialEffects())
        checkInvariants()
    }

    /// Resumes the placement a previous daemon left in `pinned` (its maps, opened from its pins):
    /// the new programs use those very maps, so every flow record, the bucket table with its
    /// flags and the counters carry on. The slots its rows name get new sockets (and, from the
    /// caller, new workers) at the same indices, so a recorded flow goes to the same slot. A
    /// change that was learning switches at its switch time (CLOCK_MONOTONIC, which a restart
    /// does not reset); one that was draining retires its leaving slots as before. Failover is
    /// not resumed: every slot starts afresh, and the table keeps lent buckets where they are (no
    /// flow moves). What the pins say is read into a model by `PlacementModel(resuming:)`.
    ///
    /// `existing`: as for the other initializer (those slots hold sockets whatever the rows say).
    /// `canary`: the canary the records name (`CanaryRecords.pinned`), resumed if the pins agree.
    ///
    /// `socketArrays`: each listener's pinned REUSEPORT_SOCKARRAY, which the new program uses
    /// too. A socket can be in one array only (net/core/sock_reuseport.c: its sk_user_data
    /// names it), and an `existing` socket still is in the previous program's array, which
    /// stays alive while that program is attached: reusing the array keeps every socket where
    /// it is, and the new program replaces the old one in the group in one step.
    public init(endpoints: [Endpoint], resuming pinned: DispatchMaps, options: Options,
                existing: [UInt32: [ReuseportSocket]] = [:], socketArrays: [SocketArray?] = [],
                canary: PinnedCanary? = nil) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        try pinned.checkConfiguredABI()
        let image = try PinnedPlacement(reading: pinned, bucketCount: options.bucketCount, canary: canary)
        guard Int(image.config.bucket_count) == options.bucketCount, image.config.seed == options.seed,
              pinned.holdsBuckets(options.bucketCount)
        else {
            throw ReuseportError.invalidArgument("the pinned change has bucket_count \(image.config.bucket_count) (a table of "
                + "\(pinned.buckets.maxEntries)), seed \(image.config.seed); the configuration says \(options.bucketCount), "
                + "\(options.seed)")
        }
        model = try PlacementModel(resuming: image, tracking: options.tracking,
                                   hasUDP: endpoints.contains { $0.transport == .udp }, existing: Set(existing.keys),
                                   now: MonotonicClock.nanoseconds())
        var resolved = options
        resolved.tracking.maxFlows = Int(pinned.flows.maxEntries)
        model.tracking.maxFlows = resolved.tracking.maxFlows
        settings = resolved
        var listeners: [Listener] = []
        for (index, requested) in endpoints.enumerated() {
            let program = try DispatchProgram(sharing: pinned, trackedFlows: Int(pinned.flows.maxEntries),
                                              socketArray: index < socketArrays.count ? socketArrays[index] : nil)
            listeners.append(try Self.listener(requested, index: index, program: program, existing: existing,
                                               options: resolved, attach: true))
        }
        maps = pinned
        self.listeners = listeners
        model.slotCapacity = Self.slotCapacity(maps: maps, listeners: listeners)
        try apply(model.liveSlots.map { .insertSockets(slot: $0) })
        var model = self.model
        try apply(model.spreadFallback(over: model.fallbackSlots))
        self.model = model
        // The pins describe this plane from now on (socket_slots above all: pins of an earlier
        // version may not have bounded the slots outside a change).
        try apply([.writeTransition(model.transitionRecord)])
        checkInvariants()
    }

    /// Every slot a previous daemon's pins name is below this: rp_config's slot_count,
    /// rp_transition's socket_slots and the highest row of rp_slot_state that names a worker or a
    /// state. The slots in use need not be 0..<slot_count (after an upgrade they are the new
    /// generation's, 4..7 say, or 0, 1, 4..7 once it scaled), and pins an earlier version wrote
    /// bound them by socket_slots only while a change ran: the rows are read too (the array holds
    /// RP_MAX_SLOTS of them; reading all takes about a millisecond, once at start-up).
    public static func pinnedSlotBound(_ maps: DispatchMaps) -> Int {
        let config = try? maps.readConfig()
        let change = try? maps.readTransition()
        let rows = min(Int(maps.slotState.maxEntries), Int(RP_MAX_SLOTS))
        let pinned = min(max(Int(config?.slot_count ?? 0), Int(change?.socket_slots ?? 0)), rows)
        for slot in stride(from: rows - 1, through: pinned, by: -1) {
            guard let row = try? maps.readSlotState(UInt32(slot)) else { continue }
            if row.pid != 0 || row.state != RP_WORKER_EMPTY.rawValue { return slot + 1 }
        }
        return pinned
    }

    /// The maps a previous daemon pinned for this service, if they hold a placement change this
    /// plane can finish (same ABI, seed and bucket count); nil otherwise.
    public static func resumableChange(at layout: PinLayout, options: Options) -> DispatchMaps? {
        guard let maps = resumable(at: layout, options: options), let change = try? maps.readTransition(),
              change.phase != RP_TRANSITION_NONE.rawValue
        else { return nil }
        return maps
    }

    /// The maps a previous daemon pinned for this service, if this plane can take them over as
    /// they are (same ABI, seed and bucket count); nil otherwise.
    public static func resumable(at layout: PinLayout, options: Options) -> DispatchMaps? {
        guard let maps = try? DispatchMaps(pinned: layout), (try? maps.checkConfiguredABI()) != nil,
              let config = try? maps.readConfig(), Int(config.bucket_count) == options.bucketCount,
              config.seed == options.seed, maps.holdsBuckets(options.bucketCount)
        else { return nil }
        return maps
    }

    /// Listener `index` of a new plane: its program, the `existing` sockets of every slot on it,
    /// and, when none was given for slot 0, a new socket there, which fixes the port when 0 was
    /// asked (the others join its group). The program is attached through one of them.
    private static func listener(_ requested: Endpoint, index: Int, program: DispatchProgram,
                                 existing: [UInt32: [ReuseportSocket]], options: Options, attach: Bool) throws
        -> Listener
    {
        var given: [UInt32: ReuseportSocket] = [:]
        for (slot, sockets) in existing where index < sockets.count { given[slot] = sockets[index] }
        // Sockets of one group share (protocol, address, port): the first given fixes the port.
        let ports = Set(given.values.map(\.endpoint.address.port))
        guard ports.count <= 1 else {
            throw ReuseportError.invalidArgument("the sockets given for \(requested) are bound to different ports: \(ports.sorted())")
        }
        let first = try given[0] ?? given.values.first
            ?? ReuseportSocket(endpoint: requested, receiveBuffer: options.receiveBuffer, v6Only: options.v6Only)
        if attach { try first.attach(program) }
        let listener = Listener(endpoint: first.endpoint, program: program)
        listener.sockets = given
        if given.isEmpty { listener.sockets[0] = first }
        return listener
    }

    /// The working and last generation numbers a previous plane of the service left in its pins
    /// (this ABI only); nil when there are none to read.
    public static func pinnedGenerations(at layout: PinLayout) -> (working: UInt32, last: UInt32)? {
        guard let maps = try? DispatchMaps(pinned: layout), (try? maps.checkConfiguredABI()) != nil,
              let change = try? maps.readTransition(), change.last_generation > 0
        else { return nil }
        return (change.working_generation, change.last_generation)
    }

    /// The slots the plane can use: what its slot-indexed maps and every listener's socket array hold.
    private static func slotCapacity(maps: DispatchMaps, listeners: [Listener]) -> Int {
        listeners.map { Int($0.program.sockets.map.maxEntries) }.reduce(maps.slotCapacity, min)
    }

    /// How many slots the service's slot-indexed maps hold (`SlotCapacity`).
    public var slotCapacity: Int { model.slotCapacity }

    /// The slots that hold a socket (on the first listener; every operation here fills and
    /// empties a slot on all listeners together).
    public var liveSlots: [UInt32] { listeners[0].sockets.keys.sorted() }

    // MARK: carrying out the model's writes

    /// Makes the writes, in order. Returns the sockets the writes took out of the arrays
    /// (`takeSockets`), by slot, in listener order: the caller's now.
    @discardableResult
    private func apply(_ effects: [PlacementEffect]) throws -> [UInt32: [ReuseportSocket]] {
        var taken: [UInt32: [ReuseportSocket]] = [:]
        for effect in effects {
            switch effect {
            case .insertSockets(let slot):
                try insertSockets(slot)
            case .closeSockets(let slot):
                // Their workers, if any, are being stopped and answer nothing more: out of the
                // port first, so that no close swallows the group's datagrams (leavePort).
                _ = ReuseportSocket.leavePortAndClose(try takeSockets(slot))
            case .takeSockets(let slot):
                taken[slot] = try takeSockets(slot)
            case .writeFallback(let table, let previous):
                try maps.writeFallback(table, previous: previous)
            case .writeConfig(let slotCount, let liveCount, let recordCostNs, let changing):
                try maps.writeConfig(seed: settings.seed, bucketCount: settings.bucketCount, slotCount: slotCount,
                                     liveCount: liveCount, recordCostNs: recordCostNs, changing: changing,
                                     quic: settings.quic)
            case .writeChanging(let changing):
                try maps.writeChanging(changing)
            case .writeBuckets(let values, let previous):
                try maps.writeBuckets(values, previous: previous)
            case .writeNextBuckets(let table):
                try maps.writeNextBuckets(table)
            case .writeTransition(let record):
                try maps.writeTransition(record)
            case .clearRecords:
                for (key, _) in try maps.flows.entries(as: (rp_flow_key, rp_flow).self) { try maps.flows.delete(key: key) }
            case .clearUntrackedMarkers:
                var keys: [rp_flow_key] = []
                try maps.untracked.forEachEntry(as: (rp_flow_key, UInt32).self) { key, _ in keys.append(key) }
                for key in keys { try maps.untracked.delete(key: key) }
            }
        }
        return taken
    }

    /// Runs one operation of the model: on a copy, whose writes are then made; the copy becomes
    /// the plane's model once all are made. If a write fails, the kernel's state is not known:
    /// the writes that say the previous model again are made (`restoreEffects`), and the error
    /// is thrown. Sockets the operation took stay taken (they are the caller's only on success:
    /// here they close).
    private func run<Result>(_ operation: (inout PlacementModel) throws -> (Result, [PlacementEffect])) throws
        -> (result: Result, taken: [UInt32: [ReuseportSocket]])
    {
        var next = model
        let (result, effects) = try operation(&next)
        let taken: [UInt32: [ReuseportSocket]]
        do {
            taken = try apply(effects)
        } catch {
            try? apply(model.restoreEffects(held: Set(liveSlots)))
            throw error
        }
        model = next
        checkInvariants()
        return (result, taken)
    }

    /// Records what `PlacementModel.violations` finds, and that the sockets held are the model's.
    private func checkInvariants() {
        var found = model.violations()
        if Set(liveSlots) != Set(model.slotGenerations.keys) {
            found.append("the plane holds sockets at slots \(liveSlots) but the placement at \(model.liveSlots)")
        }
        guard !found.isEmpty else { return }
        invariantViolationCount += found.count
        invariantViolations = Array((invariantViolations + found).suffix(16))
    }

    /// Binds (if not yet bound) and inserts the slot's socket on every listener.
    private func insertSockets(_ slot: UInt32) throws {
        // A slot keeping its socket (adopted) keeps its counters; a new socket starts at zero.
        if listeners[0].sockets[slot] == nil { try maps.resetSlotCounters(slot) }
        for listener in listeners {
            let socket = try listener.sockets[slot]
                ?? ReuseportSocket(endpoint: listener.endpoint, receiveBuffer: settings.receiveBuffer,
                                   v6Only: settings.v6Only)
            listener.sockets[slot] = socket
            // An adopted socket may be in the (reused) array at this slot already: inserting it
            // again would be EBUSY.
            if let cookie = try? socket.cookie(), try listener.program.sockets.cookie(at: slot) == cookie { continue }
            try Self.insert(socket, into: listener.program.sockets, at: slot)
        }
    }

    /// A socket kept in systemd's fd store across a restart (`existing`) is still in the previous
    /// daemon's array, unpinned, until that array is freed: after the previous program's release
    /// (replaced in the group when this plane attached its own), an RCU grace period and a work
    /// item, a few milliseconds. Until then inserting it is EBUSY: waited for, at most
    /// `adoptionWaitNs`. A socket this plane bound is never busy.
    private static func insert(_ socket: ReuseportSocket, into array: SocketArray, at slot: UInt32) throws {
        let deadline = MonotonicClock.nanoseconds() + adoptionWaitNs
        while true {
            do {
                return try array.insert(socket, at: slot)
            } catch let error as ReuseportError where error.errno == EBUSY && MonotonicClock.nanoseconds() < deadline {
                usleep(1000)
            }
        }
    }

    static let adoptionWaitNs: Int64 = 2_000_000_000

    /// Takes the slot's sockets out of the arrays and out of this plane, open, in listener order.
    private func takeSockets(_ slot: UInt32) throws -> [ReuseportSocket] {
        var taken: [ReuseportSocket] = []
        for listener in listeners {
            try listener.program.sockets.remove(at: slot)
            if let socket = listener.sockets.removeValue(forKey: slot) { taken.append(socket) }
        }
        return taken
    }

    /// Hands every slot's sockets to the caller, open, by slot (in listener order), and takes
    /// them out of this plane's arrays. For a plane that was replaced in its groups (another
    /// plane's program is attached now, `attachPrograms`): nothing is steered to these sockets
    /// any more, and what is queued in them is read by their workers while the caller drains.
    /// Leaving slots too: their workers still read what their records steered there. The plane
    /// is done after this: its placement holds no socket.
    public func handOverSockets() throws -> [UInt32: [ReuseportSocket]] {
        try run { model in ((), model.liveSlots.map { model.takeSockets($0) }) }.taken
    }

    /// The sockets of `slot`, one per listener, in listener order: what its worker gets.
    public func sockets(ofSlot slot: UInt32) -> [ReuseportSocket] {
        listeners.compactMap { $0.sockets[slot] }
    }

    // MARK: operations that apply at once

    /// Changes the number of slots to `count` (slots 0..<count), moving the fewest buckets.
    /// New slots' sockets are bound and inserted before any bucket points at them; removed
    /// slots lose their buckets before their sockets leave the arrays and close. A slot that
    /// is failed over stays so; a removed one is no longer. Returns the number of nominal
    /// buckets that moved. If a write fails, the previous placement is written back.
    @discardableResult
    public func resize(to count: Int) throws -> Int {
        let (moved, removed) = try resizeKeepingRemoved(to: count)
        _ = ReuseportSocket.leavePortAndClose(Array(removed.values.joined()))
        return moved
    }

    /// `resize(to:)`, except that the removed slots' sockets are not closed: they leave the
    /// arrays and this plane and are handed to the caller, open, by slot (in listener order).
    ///
    /// This is for draining: once no bucket and no fallback entry names a removed slot, no new
    /// datagram is steered to its socket, but what is already queued there is only read if the
    /// socket stays open and its worker still runs. Closing the last descriptor of a UDP socket
    /// frees its receive queue (udp_destruct_common in net/ipv4/udp.c). The
    /// caller owns the sockets now and closes them when their queues are empty.
    public func resizeKeepingRemoved(to count: Int) throws -> (moved: Int, removed: [UInt32: [ReuseportSocket]]) {
        let (moved, taken) = try run { try $0.resize(to: count) }
        return (moved, taken)
    }

    /// Replaces the nominal bucket table; rp_buckets gets it with the failover laid over it.
    public func setBuckets(_ table: [UInt32]) throws {
        _ = try run { ((), try $0.setBuckets(table)) }
    }

    /// Spreads `slot`'s buckets over the other slots that are not failed over, moving no other
    /// bucket. Returns how many buckets it lent.
    @discardableResult
    public func failOver(_ slot: UInt32) throws -> Int {
        let now = MonotonicClock.nanoseconds()
        return try run { try $0.setFailedOver(slot, failing: true, now: now) }.result
    }

    /// Gives a failed-over slot back exactly the buckets it lent. Returns how many.
    @discardableResult
    public func restore(_ slot: UInt32) throws -> Int {
        let now = MonotonicClock.nanoseconds()
        return try run { try $0.setFailedOver(slot, failing: false, now: now) }.result
    }

    /// Takes the slot's sockets out of the arrays and closes them; its flows fall back. The
    /// fallback table stops naming the slot first.
    public func closeSlot(_ slot: UInt32) throws {
        _ = try run { ((), $0.closeSlot(slot)) }
    }

    /// Puts a fresh socket at `slot` on every listener (after `closeSlot`, or to replace one).
    public func reopenSlot(_ slot: UInt32) throws {
        _ = try run { ((), $0.reopenSlot(slot)) }
    }

    // MARK: placement changes that keep live flows

    /// Takes new tracking settings (not `maxFlows`: rp_flows is sized at load). While a change
    /// runs, they wait for its end: it keeps the settings it started with.
    public func setTracking(_ tracking: FlowTracking) throws {
        _ = try run { ((), $0.setTracking(tracking)) }
    }

    /// Starts (or extends) a change to `count` slots (PlacementModel.beginResize).
    @discardableResult
    public func beginResize(to count: Int, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { try $0.beginResize(to: count, now: now, learnNs: learnNs, records: records) }.result
    }

    /// Gives starved slots their share back as a change (PlacementModel.rebalanceIfStarved): after
    /// taking over pins whose failover was not pinned. Returns the plan, nil when none was starved.
    @discardableResult
    public func rebalanceIfStarved(now: Int64) throws -> TransitionPlan? {
        guard model.isStarved else { return nil }
        let records = try liveRecordsBySlot(now: now)
        return try run { model -> (TransitionPlan?, [PlacementEffect]) in
            guard let (plan, effects) = model.rebalanceIfStarved(now: now, records: records) else { return (nil, []) }
            return (plan, effects)
        }.result
    }

    /// Starts giving a failed-over slot its buckets back as a change (PlacementModel.beginRestore).
    @discardableResult
    public func beginRestore(_ slot: UInt32, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { $0.beginRestore(slot, now: now, learnNs: learnNs, records: records) }.result
    }

    /// The slots of a change to `count` slots from `base` (PlacementModel.targetSlots).
    public func targetSlots(resizing base: [UInt32], to count: Int) throws -> [UInt32] {
        try model.targetSlots(resizing: base, to: count)
    }

    // MARK: a rebuild (reload) that keeps the placement

    /// Takes the placement of `old`, the plane a reload rebuilds, on this plane built beside it
    /// and not attached yet (nothing steers through it, so the order of these writes does not
    /// matter): the slots that hold sockets there and the generation of each, the bucket table,
    /// the fallback table, and the change in progress with its flow records
    /// (PlacementModel.carry). Once attached, every flow goes to the slot it went to before, and
    /// the change goes on here; a fresh plane's even table would move about (N−1)/N of the flows
    /// of a table that a scale left.
    ///
    /// Only with the same bucket count and seed (otherwise a flow's bucket is another one, and
    /// flows move by nature): returns false then, and changes nothing. Called once
    /// `continueGenerations` numbered this plane's working generation. Records are copied again
    /// just before the switch (`copyRecords`): the old program makes them until then.
    @discardableResult
    public func carryPlacement(from old: ServiceDataPlane, now: Int64) throws -> Bool {
        guard old.options.bucketCount == options.bucketCount, old.options.seed == options.seed else { return false }
        let previous = old.model
        _ = try run { model in ((), model.carry(from: previous, now: now)) }
        try copyRecords(from: old)
        try apply([.writeTransition(model.transitionRecord)])
        return true
    }

    /// Copies `old`'s flow records and untracked markers into this plane's maps (over any with
    /// the same key: the old program's last sighting is the newer). Returns the records that
    /// did not fit (`max_tracked_flows` made smaller): their flows follow the table.
    @discardableResult
    public func copyRecords(from old: ServiceDataPlane) throws -> Int {
        let records = try old.maps.flows.entries(as: (rp_flow_key, rp_flow).self)
        let copied = records.isEmpty ? 0 : try maps.flows.updateBatch(records.map(\.0), records.map(\.1))
        let markers = try old.maps.untracked.entries(as: (rp_flow_key, UInt32).self)
        if !markers.isEmpty { try maps.untracked.updateBatch(markers.map(\.0), markers.map(\.1)) }
        return records.count - copied
    }

    // MARK: generations

    /// Generations older than the working one that may hold slots at once.
    public static let maxDrainingGenerations = PlacementModel.maxDrainingGenerations

    /// Takes the generation counter a previous plane of the service reached (its pins, or the
    /// plane a reload replaces): numbers go on from there.
    public func continueGenerations(working: UInt32, last: UInt32) throws {
        _ = try run { ((), try $0.continueGenerations(working: working, last: last)) }
    }

    /// Starts a new generation of `count` slots beside the working one (PlacementModel.startGeneration).
    public func startGeneration(count: Int, now: Int64) throws -> StartingGeneration {
        try run { try $0.startGeneration(count: count) }.result
    }

    /// Gives up the starting generation: its sockets leave the arrays and close.
    public func abandonGeneration(now: Int64) throws {
        _ = try run { ((), $0.abandonGeneration()) }
    }

    /// Makes the starting generation the working one, as a placement change of every bucket
    /// (PlacementModel.switchGeneration).
    @discardableResult
    public func switchGeneration(now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { try $0.switchGeneration(now: now, learnNs: learnNs, records: records) }.result
    }

    /// Sends `percent` % of the buckets' new flows to the starting generation, as a change that
    /// keeps live flows (PlacementModel.startCanary); `switchGeneration` promotes it.
    @discardableResult
    public func startCanary(percent: Int, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { try $0.startCanary(percent: percent, now: now, learnNs: learnNs, records: records) }.result
    }

    /// Takes a canary's buckets back, keeping its live flows until idle (PlacementModel.rollBackCanary).
    @discardableResult
    public func rollBackCanary(now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { try $0.rollBackCanary(now: now, learnNs: learnNs, records: records) }.result
    }

    /// Makes a generation whose slots are still leaving the working one again (PlacementModel.rollBack).
    @discardableResult
    public func rollBack(to generation: UInt32, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let records = try liveRecordsBySlot(now: now)
        return try run { try $0.rollBack(to: generation, now: now, learnNs: learnNs, records: records) }.result
    }

    /// Switches a pending change whose learning is over (or any, with `force`). Returns the
    /// buckets moved, nil when nothing was due. With `drainNow`, the leaving slots' deadline is now.
    @discardableResult
    public func advance(now: Int64, force: Bool = false, drainNow: Bool = false) throws -> Int? {
        guard model.pending != nil else { return nil }
        return try run { model -> (Int?, [PlacementEffect]) in
            guard let (moved, effects) = model.advance(now: now, force: force, drainNow: drainNow) else { return (nil, []) }
            return (moved, effects)
        }.result
    }

    /// Takes a leaving slot's sockets out of the arrays and out of this plane, open (in listener
    /// order), for the caller to drain and close. Its recorded flows, if any are left, follow
    /// the table from now on.
    public func retire(_ slot: UInt32, now: Int64) throws -> [ReuseportSocket] {
        try run { ((), try $0.retire(slot)) }.taken[slot] ?? []
    }

    /// Live records by slot: read every record, delete the stale ones
    /// (PlacementModel.recordIsStale; `forget`: failed-over slots, whose flows have no worker).
    /// Once no change is pending or leaving and no record is live, the change is over
    /// (PlacementModel.finishIfDone).
    public func sweep(now: Int64, forget: Set<UInt32> = []) throws -> SweepResult {
        let clock = UInt64(now)
        var live: [UInt32: Int] = [:]
        var expired = 0
        // Raw entries: a sweep of a million records must not build a million FlowTuples.
        var stale: [rp_flow_key] = []
        try maps.flows.forEachEntry(as: (rp_flow_key, rp_flow).self) { key, record in
            let idle = clock > record.last_seen_ns ? clock - record.last_seen_ns : 0
            if model.recordIsStale(slot: record.slot, idleNs: idle, forget: forget) {
                stale.append(key)
            } else {
                live[record.slot, default: 0] += 1
            }
        }
        // Deleted after the walk: a batch walk over a hash table that changes under it may skip
        // or repeat a bucket.
        for key in stale where try maps.flows.delete(key: key) { expired += 1 }
        let total = live.values.reduce(0, +)
        let finished = try run { model -> (Bool, [PlacementEffect]) in
            guard let effects = model.finishIfDone(live: total) else { return (false, []) }
            return (true, effects)
        }.result
        return SweepResult(liveBySlot: live, expired: expired, finished: finished)
    }

    /// Live records by slot, without deleting anything.
    public func liveRecordsBySlot(now: Int64) throws -> [UInt32: Int] {
        let idleNs = UInt64(model.tracking.idleTimeoutMs) * 1_000_000
        let clock = UInt64(now)
        var live: [UInt32: Int] = [:]
        try maps.flows.forEachEntry(as: (rp_flow_key, rp_flow).self) { _, record in
            let seen = record.last_seen_ns
            if clock <= seen || clock - seen <= idleNs { live[record.slot, default: 0] += 1 }
        }
        return live
    }

    /// Attaches every listener's program to its group through the listener's first socket
    /// (SO_ATTACH_REUSEPORT_EBPF): for each group one atomic switch, from whatever program it
    /// had (reuseport_attach_prog() replaces reuse->prog under the group's lock), to this one.
    /// From then on every packet of the group is steered to this plane's sockets, also those
    /// the kernel had been steering to another plane's sockets in the same group. If a later
    /// listener fails, the earlier ones stay switched: the caller switches them back.
    public func attachPrograms() throws {
        for listener in listeners {
            guard let socket = listener.sockets.values.first else {
                throw ReuseportError.invalidArgument("listener \(listener.endpoint) has no socket to attach through")
            }
            try socket.attach(listener.program)
        }
    }

    /// Adds records to rp_flows in bulk (BPF_MAP_UPDATE_BATCH, 5.6), as the program makes them
    /// while a change learns: for benchmarks and tests that need a table of a given size.
    /// Returns how many were added before the table was full.
    @discardableResult
    public func insertRecords(_ keys: [rp_flow_key], _ values: [rp_flow]) throws -> Int {
        try maps.flows.updateBatch(keys, values)
    }

    /// Forgets every record naming `slot` (a slot failed over: its flows have no worker and move).
    public func forgetRecords(of slot: UInt32) throws {
        for (key, record) in try maps.flows.entries(as: (rp_flow_key, rp_flow).self) where record.slot == slot {
            try maps.flows.delete(key: key)
        }
    }

    /// Publishes a slot's worker row in rp_slot_state (for reuseportctl).
    public func publish(_ state: rp_slot_state, slot: UInt32) throws {
        try maps.writeSlotState(slot, state)
    }

    /// What the program would do with a flow now.
    public func snapshot(listener: Int = 0) throws -> SteeringSnapshot {
        try SteeringSnapshot(maps: maps, sockets: listeners[listener].program.sockets)
    }

    /// Pins the shared maps and every listener's program and socket array under `layout`.
    public func pin(_ layout: PinLayout) throws {
        try layout.create(listeners: listeners.count)
        try maps.pin(layout)
        for (index, listener) in listeners.enumerated() { try listener.program.pin(layout, listener: index) }
    }

    /// Closes every socket. The program and maps go when the last fd to them closes.
    /// `leavingPort`: each UDP socket leaves its port first (ReuseportSocket.leavePort), for a
    /// plane whose groups go on serving another plane (a rebuild that failed); its workers must
    /// be answering nothing.
    public func close(leavingPort: Bool = false) {
        let sockets = listeners.flatMap(\.sockets.values)
        for listener in listeners { listener.sockets.removeAll() }
        if leavingPort {
            _ = ReuseportSocket.leavePortAndClose(sockets)
        } else {
            for socket in sockets { socket.close() }
        }
    }

    deinit { close() }
}

/// A placement a change will switch to: nominal table, slots, failed-over slots.
public struct PendingPlacement: Sendable, Equatable {
    public var buckets: [UInt32]
    public var slots: [UInt32]
    public var failed: Set<UInt32>
    /// When learning ends (CLOCK_MONOTONIC).
    public var switchNs: Int64

    /// Buckets sent to a canary generation's slots beside the set (`PlacementModel.startCanary`):
    /// bucket → canary slot, laid over the table.
    public var canary: [Int: UInt32] = [:]

    public init(buckets: [UInt32], slots: [UInt32], failed: Set<UInt32>, switchNs: Int64,
                canary: [Int: UInt32] = [:]) {
        self.buckets = buckets
        self.slots = slots
        self.failed = failed
        self.switchNs = switchNs
        self.canary = canary
    }

    /// The table rp_buckets will hold: the failed-over slots' buckets lent to the others, and
    /// a canary's buckets at its slots.
    public var effective: [UInt32] {
        var table = BucketAssignment.overlay(buckets, slots: slots, failed: failed)
        for (bucket, slot) in canary { table[bucket] = slot }
        return table
    }
}

/// A generation whose slots hold sockets and whose workers start, before any flow is steered to it.
public struct StartingGeneration: Sendable, Equatable {
    public var generation: UInt32
    public var slots: [UInt32]
}

/// What a change will do, said before it does it (`reuseportctl scale --dry-run`).
public struct TransitionPlan: Sendable, Equatable {
    public var movingBuckets: Int
    public var bucketCount: Int
    /// When the buckets switch (CLOCK_MONOTONIC).
    public var switchNs: Int64
    /// Slots that leave at the switch and retire once drained.
    public var leaving: [UInt32]
    /// Live recorded flows on those slots now: they move if the change does not wait for them.
    public var recordedFlowsOnLeaving: Int

    public init(movingBuckets: Int, bucketCount: Int, switchNs: Int64, leaving: [UInt32], recordedFlowsOnLeaving: Int) {
        self.movingBuckets = movingBuckets
        self.bucketCount = bucketCount
        self.switchNs = switchNs
        self.leaving = leaving
        self.recordedFlowsOnLeaving = recordedFlowsOnLeaving
    }
}

/// What a sweep of the records found.
public struct SweepResult: Sendable, Equatable {
    public var liveBySlot: [UInt32: Int]
    public var expired: Int
    /// The change ended with this sweep.
    public var finished: Bool
    public var live: Int { liveBySlot.values.reduce(0, +) }
}
