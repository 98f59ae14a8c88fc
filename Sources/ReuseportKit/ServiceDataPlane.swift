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
/// socket arrays, rp_slot_state) and holds what they must say:
/// - the *nominal* bucket table (`buckets`): where each bucket's flows belong;
/// - the failover overlay (`failedOver`): slots whose buckets are lent to the others;
/// - the *effective* table (`effectiveBuckets`): the nominal one with the overlay laid over
///   it, which is what rp_buckets holds;
/// - the fallback table (`fallback`): rp_fallback, spread over the slots holding a socket.
/// Every change (resize, failover, restore, a slot closed or reopened) is one operation
/// here, so that no write ever puts a table in the kernel that the others do not know.
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
        /// rp_flows' capacity.
        public var maxFlows: Int
        /// New records per second for the whole service: nil (the default) spreads `maxFlows` over
        /// one learning window plus the one second of credit the token bucket starts with (at
        /// least 1 a second), so that new tuples sprayed while a change learns cannot fill the
        /// table before the window ends; 0: no bound.
        public var recordsPerSecond: Int?
        /// Leaving slots retire at most this long after the switch, live records or not (0: never).
        public var drainTimeoutMs: Int

        public init(enabled: Bool = true, idleTimeoutMs: Int = 60_000, maxFlows: Int = Int(RP_DEFAULT_TRACKED_FLOWS),
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
            return Swift.max(1, maxFlows * 1000 / window)
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

    public private(set) var options: Options
    /// The service's maps, for reading (counters, tables, state). Only this type writes them.
    public let maps: DispatchMaps
    public let listeners: [Listener]
    /// Slot indices in use: 0..<slot count.
    public private(set) var slots: [UInt32]
    /// The nominal bucket table: where each bucket's flows belong.
    public private(set) var buckets: [UInt32]
    /// Slots whose buckets are failed over: spread over the other slots in rp_buckets.
    public private(set) var failedOver: Set<UInt32> = []
    /// The table rp_buckets holds: `buckets` with the failed-over slots' buckets spread over
    /// the other slots, moving no other bucket.
    public private(set) var effectiveBuckets: [UInt32]
    /// The table rp_fallback holds: the slots holding a socket, each on about
    /// RP_FALLBACK_BUCKETS / live entries.
    public private(set) var fallback: [UInt32]
    /// Each bucket's part in a placement change (RP_BUCKET_LEARN, RP_BUCKET_PINNED), written
    /// beside its slot in rp_buckets; all 0 in steady state.
    public private(set) var bucketFlags: [UInt32]
    /// The change being learned: what the switch will write.
    public private(set) var pending: PendingPlacement?
    /// Slots that hold sockets but are no longer in `slots`: their recorded flows still go there.
    /// Each retires (`retire(_:)`) once no live record names it, or at `drainDeadlineNs`.
    public private(set) var leaving: Set<UInt32> = []
    /// When the current change ends, records or not (CLOCK_MONOTONIC); nil before a switch or
    /// with no limit.
    public private(set) var drainDeadlineNs: Int64?
    /// When the current change started, for status (CLOCK_MONOTONIC).
    public private(set) var transitionStartedNs: Int64?
    /// The generation taking new flows (its slots are `slots`), and the last number given out:
    /// both kept in rp_transition, so that a number is never given out twice for the service.
    public private(set) var workingGeneration: UInt32 = 1
    public private(set) var lastGeneration: UInt32 = 1
    /// The generation of each slot holding a socket (a leaving slot keeps its own until it retires).
    public private(set) var slotGenerations: [UInt32: UInt32] = [:]
    /// A generation whose slots hold sockets but take no flow yet: its workers are starting.
    public private(set) var startingGeneration: StartingGeneration?
    /// The generation the pending change makes the working one at its switch (nil: the change
    /// keeps the working generation, as a scale does).
    public private(set) var pendingGeneration: UInt32?

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
    public init(endpoints: [Endpoint], slotCount: Int, options: Options = Options(), attach: Bool = true,
                existing: [UInt32: [ReuseportSocket]] = [:], socketArrays: [SocketArray?] = []) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        _ = try SlotCount(slotCount)
        _ = try BucketCount(options.bucketCount)
        self.options = options
        var listeners: [Listener] = []
        var shared: DispatchMaps?
        for (index, requested) in endpoints.enumerated() {
            let program = try DispatchProgram(sharing: shared, trackedFlows: options.tracking.maxFlows,
                                              bucketCount: options.bucketCount,
                                              socketArray: index < socketArrays.count ? socketArrays[index] : nil)
            shared = shared ?? program.maps
            listeners.append(try Self.listener(requested, index: index, program: program, existing: existing,
                                               options: options, attach: attach))
        }
        self.maps = shared!
        self.listeners = listeners
        self.slots = Array(0..<UInt32(slotCount))
        self.buckets = BucketAssignment.initial(bucketCount: options.bucketCount, slots: slots)
        self.effectiveBuckets = buckets
        self.bucketFlags = Array(repeating: 0, count: options.bucketCount)
        self.fallback = BucketAssignment.initial(bucketCount: Int(RP_FALLBACK_BUCKETS), slots: slots)
        for slot in slots { try insertSockets(slot) }
        try maps.writeBuckets(buckets)
        try maps.writeFallback(fallback)
        try persist(now: 0)
        try spreadFallback(over: liveSlots)
    }

    /// Resumes the placement change a previous daemon left in `pinned` (its maps, opened from its
    /// pins; `change.phase` is not NONE): the new programs use those very maps, so every flow
    /// record, the bucket table with its flags and the counters carry on. Slots
    /// 0..<socket_slots get new sockets (and, from the caller, new workers) at the same indices,
    /// so a recorded flow goes to the same slot. A change that was learning switches at its
    /// switch time (CLOCK_MONOTONIC, which a restart does not reset); one that was draining
    /// retires its leaving slots as before. Failover is not resumed: every slot starts afresh,
    /// and the table keeps lent buckets where they are (no flow moves).
    ///
    /// `existing`: as for the other initializer. A change need not be in progress: with phase
    /// NONE this takes over a previous daemon's maps and tables as they are (the workers it
    /// adopts keep their sockets: `existing`).
    ///
    /// `socketArrays`: each listener's pinned REUSEPORT_SOCKARRAY, which the new program uses
    /// too. A socket can be in one array only (net/core/sock_reuseport.c: its sk_user_data
    /// names it), and an `existing` socket still is in the previous program's array, which
    /// stays alive while that program is attached: reusing the array keeps every socket where
    /// it is, and the new program replaces the old one in the group in one step.
    public init(endpoints: [Endpoint], resuming pinned: DispatchMaps, options: Options,
                existing: [UInt32: [ReuseportSocket]] = [:], socketArrays: [SocketArray?] = []) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        let config = try pinned.readConfig()
        let change = try pinned.readTransition()
        try pinned.checkConfiguredABI()
        guard Int(config.bucket_count) == options.bucketCount, config.seed == options.seed,
              pinned.holdsBuckets(options.bucketCount)
        else {
            throw ReuseportError.invalidArgument("the pinned change has bucket_count \(config.bucket_count) (a table of "
                + "\(pinned.buckets.maxEntries)), seed \(config.seed); the configuration says \(options.bucketCount), "
                + "\(options.seed)")
        }
        let nominal = try SlotCount(Int(config.slot_count)).value
        let socketSlots = try SlotCount(max(Self.pinnedSlotBound(pinned), nominal), what: "socket_slots").value
        self.options = options
        var listeners: [Listener] = []
        for (index, requested) in endpoints.enumerated() {
            let program = try DispatchProgram(sharing: pinned, trackedFlows: options.tracking.maxFlows,
                                              socketArray: index < socketArrays.count ? socketArrays[index] : nil)
            listeners.append(try Self.listener(requested, index: index, program: program, existing: existing,
                                               options: options, attach: true))
        }
        maps = pinned
        self.listeners = listeners
        // Slots hold sockets where the previous daemon published a worker; those of the working
        // generation are the slots in use (after an upgrade they need not start at 0).
        workingGeneration = max(change.working_generation, 1)
        lastGeneration = max(change.last_generation, workingGeneration)
        var rows: [UInt32: rp_slot_state] = [:]
        for slot in 0..<UInt32(socketSlots) {
            if let row = try? pinned.readSlotState(slot), row.state != RP_WORKER_EMPTY.rawValue { rows[slot] = row }
        }
        // The rows say which slots are the set (RP_SLOT_IN_SET). Pins of a daemon that did not
        // mark them: the working generation's rows that neither leave nor join, then any of the
        // working generation (a slot leaving a change's set still has its generation), then 0..<n.
        let workingNow = workingGeneration
        let inSet = rows.filter { $0.value.flags & UInt32(RP_SLOT_IN_SET) != 0 }.keys.sorted()
        let moving = UInt32(RP_SLOT_LEAVING) | UInt32(RP_SLOT_JOINING)
        let staying = rows.filter { $0.value.generation == workingNow && $0.value.flags & moving == 0 }.keys.sorted()
        let working = rows.filter { $0.value.generation == workingNow }.keys.sorted()
        slots = [inSet, staying, working].first { $0.count == nominal } ?? Array(0..<UInt32(nominal))
        let values = try pinned.readBucketValues(count: options.bucketCount)
        buckets = values.map { rp_bucket_slot($0) }
        effectiveBuckets = buckets
        bucketFlags = values.map { $0 & UInt32(RP_BUCKET_FLAGS) }
        fallback = try pinned.readFallback()
        transitionStartedNs = change.phase == RP_TRANSITION_NONE.rawValue ? nil : Int64(change.started_ns)
        // The change finishes with the idle timeout it started with; the file's applies after it.
        if change.idle_timeout_ns > 0, Int(change.idle_timeout_ns / 1_000_000) != options.tracking.idleTimeoutMs {
            deferredTracking = options.tracking
            self.options.tracking.idleTimeoutMs = Int(change.idle_timeout_ns / 1_000_000)
        }
        if change.phase == RP_TRANSITION_LEARNING.rawValue {
            let after = try SlotCount(Int(change.slots_after), what: "slots_after").value
            // rp_next_buckets holds the table the switch writes (failover laid over it already).
            let next = try pinned.readNextBuckets(count: options.bucketCount)
            let named = Set(next).sorted()
            pending = PendingPlacement(buckets: next, slots: named.count == after ? named : Array(0..<UInt32(after)),
                                       failed: [], switchNs: Int64(change.switch_ns))
            // A generation change that was learning: its slots' rows name the generation it makes working.
            pendingGeneration = named.compactMap { rows[$0]?.generation }.first { $0 != workingGeneration }
        } else {
            drainDeadlineNs = change.drain_deadline_ns == 0 ? nil : Int64(change.drain_deadline_ns)
        }
        let held = rows.isEmpty ? Set(0..<UInt32(socketSlots)) : Set(rows.keys)
        // An adopted slot's socket stays at its slot, named by a row or not.
        for slot in held.union(slots).union(pending?.slots ?? []).union(existing.keys).sorted() {
            try insertSockets(slot, generation: rows[slot]?.generation ?? workingGeneration)
        }
        leaving = Set(liveSlots).subtracting(slots).subtracting(pending?.slots ?? [])
        try spreadFallback(over: fallbackSlots)
        // The pins describe this plane from now on (socket_slots above all: pins of an earlier
        // version may not have bounded the slots outside a change).
        try persist(now: MonotonicClock.nanoseconds())
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
        let pinned = min(max(Int(config?.slot_count ?? 0), Int(change?.socket_slots ?? 0)), Int(RP_MAX_SLOTS))
        for slot in stride(from: Int(RP_MAX_SLOTS) - 1, through: pinned, by: -1) {
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

    /// The slots that hold a socket (on the first listener; every operation here fills and
    /// empties a slot on all listeners together).
    public var liveSlots: [UInt32] { listeners[0].sockets.keys.sorted() }

    /// Binds (if not yet bound) and inserts the slot's socket on every listener. The fallback
    /// table is the caller's to spread over it.
    private func insertSockets(_ slot: UInt32, generation: UInt32? = nil) throws {
        slotGenerations[slot] = generation ?? slotGenerations[slot] ?? workingGeneration
        // A slot keeping its socket (adopted) keeps its counters; a new socket starts at zero.
        if listeners[0].sockets[slot] == nil { try maps.resetSlotCounters(slot) }
        for listener in listeners {
            let socket = try listener.sockets[slot]
                ?? ReuseportSocket(endpoint: listener.endpoint, receiveBuffer: options.receiveBuffer,
                                   v6Only: options.v6Only)
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

    /// Takes the slot's sockets out of the arrays and closes them. The fallback table must no
    /// longer name the slot.
    private func removeSockets(_ slot: UInt32) throws {
        for socket in try takeSockets(slot) { socket.close() }
    }

    /// Takes the slot's sockets out of the arrays and out of this plane, open, in listener
    /// order. The fallback table must no longer name the slot.
    /// Hands every slot's sockets to the caller, open, by slot (in listener order), and takes
    /// them out of this plane's arrays. For a plane that was replaced in its groups (another
    /// plane's program is attached now, `attachPrograms`): nothing is steered to these sockets
    /// any more, and what is queued in them is read by their workers while the caller drains.
    /// Leaving slots too: their workers still read what their records steered there.
    public func handOverSockets() throws -> [UInt32: [ReuseportSocket]] {
        var taken: [UInt32: [ReuseportSocket]] = [:]
        for slot in liveSlots { taken[slot] = try takeSockets(slot) }
        return taken
    }

    private func takeSockets(_ slot: UInt32) throws -> [ReuseportSocket] {
        slotGenerations.removeValue(forKey: slot)
        var taken: [ReuseportSocket] = []
        for listener in listeners {
            try listener.program.sockets.remove(at: slot)
            if let socket = listener.sockets.removeValue(forKey: slot) { taken.append(socket) }
        }
        return taken
    }

    /// Writes rp_fallback spread over `live` (moving the fewest entries), then rp_config with
    /// its live count: a socket enters the array before the fallback names it, and leaves it
    /// only after the fallback no longer does. With no live slot, live_count 0 tells the
    /// program to drop, and the table stays as it was.
    private func spreadFallback(over live: [UInt32]) throws {
        if !live.isEmpty {
            let table = BucketAssignment.rebalance(fallback, to: live)
            try maps.writeFallback(table, previous: fallback)
            fallback = table
        }
        try maps.writeConfig(seed: options.seed, bucketCount: options.bucketCount, slotCount: slots.count,
                             liveCount: live.count, recordCostNs: options.tracking.recordCostNs,
                             changing: bucketFlags.contains { $0 != 0 }, quic: options.quic)
    }

    /// Writes `table` to rp_buckets (the entries that differ from `effectiveBuckets`), each with
    /// its flags (`flags`, default: as they are). If a write fails, the kernel's table is not
    /// known: the whole previous table is written back.
    /// RP_CONFIG_CHANGING goes up before the first flag is written and down after the last is
    /// gone: the program reads bucket flags only while it is up.
    private func writeEffective(_ table: [UInt32], flags: [UInt32]? = nil) throws {
        let flags = flags ?? bucketFlags
        let old = zip(effectiveBuckets, bucketFlags).map { $0 | $1 }
        let changing = flags.contains { $0 != 0 }
        if changing { try maps.writeChanging(true) }
        do {
            try maps.writeBuckets(zip(table, flags).map { $0 | $1 }, previous: old)
        } catch {
            try? maps.writeBuckets(old)
            throw error
        }
        effectiveBuckets = table
        bucketFlags = flags
        if !changing { try maps.writeChanging(false) }
    }

    /// The sockets of `slot`, one per listener, in listener order: what its worker gets.
    public func sockets(ofSlot slot: UInt32) -> [ReuseportSocket] {
        listeners.compactMap { $0.sockets[slot] }
    }

    /// Changes the number of slots to `count` (slots 0..<count), moving the fewest buckets.
    /// New slots' sockets are bound and inserted before any bucket points at them; removed
    /// slots lose their buckets before their sockets leave the arrays and close. A slot that
    /// is failed over stays so (its buckets are never given back, not even between two
    /// writes); a removed one is no longer. Returns the number of nominal buckets that moved.
    ///
    /// If binding or inserting a new slot's socket or writing the table fails, the table is
    /// written back and the new slots' sockets leave the arrays and close before the error is
    /// thrown: a socket left in an array would make the next insert at its slot fail with EBUSY.
    @discardableResult
    public func resize(to count: Int) throws -> Int {
        let (moved, removed) = try resizeKeepingRemoved(to: count)
        for socket in removed.values.joined() { socket.close() }
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
        _ = try SlotCount(count)
        let target = Array(0..<UInt32(count))
        let table = BucketAssignment.rebalance(buckets, to: target)
        let failed = failedOver.filter { $0 < UInt32(count) }
        let added = target.filter { !slots.contains($0) }
        do {
            for slot in added { try insertSockets(slot) }
            try spreadFallback(over: liveSlots)
            try writeEffective(BucketAssignment.overlay(table, slots: target, failed: failed))
        } catch {
            try? spreadFallback(over: liveSlots.filter { !added.contains($0) })
            for slot in added { try? removeSockets(slot) }
            throw error
        }
        let moved = BucketAssignment.moved(from: buckets, to: table)
        let removed = slots.filter { $0 >= UInt32(count) }
        buckets = table
        failedOver = failed
        slots = target
        // No bucket names a removed slot any more: once the fallback does not either, their
        // sockets may leave (and slot_count shrinks with it).
        try spreadFallback(over: liveSlots.filter { $0 < UInt32(count) })
        var taken: [UInt32: [ReuseportSocket]] = [:]
        for slot in removed { taken[slot] = try takeSockets(slot) }
        try persist(now: MonotonicClock.nanoseconds())
        return (moved, taken)
    }

    /// Replaces the nominal bucket table; rp_buckets gets it with the failover laid over it.
    public func setBuckets(_ table: [UInt32]) throws {
        guard table.count == options.bucketCount else {
            throw ReuseportError.invalidArgument("bucket table has \(table.count) entries, expected \(options.bucketCount)")
        }
        try writeEffective(BucketAssignment.overlay(table, slots: slots, failed: failedOver))
        buckets = table
    }

    /// Spreads `slot`'s buckets over the other slots that are not failed over, moving no other
    /// bucket. Returns how many buckets it lent.
    @discardableResult
    public func failOver(_ slot: UInt32) throws -> Int {
        try setFailedOver(failedOver.union([slot]), slot)
    }

    /// Gives a failed-over slot back exactly the buckets it lent. Returns how many.
    @discardableResult
    public func restore(_ slot: UInt32) throws -> Int {
        try setFailedOver(failedOver.subtracting([slot]), slot)
    }

    private func setFailedOver(_ failed: Set<UInt32>, _ slot: UInt32) throws -> Int {
        guard slots.contains(slot) || pending?.slots.contains(slot) == true else {
            throw ReuseportError.invalidArgument("slot \(slot) is not in use (slots 0...\(slots.count - 1))")
        }
        let table = BucketAssignment.overlay(buckets, slots: slots, failed: failed)
        let moved = BucketAssignment.moved(from: effectiveBuckets, to: table)
        // A change being learned keeps its target, with this slot failed over or back too; the
        // buckets that move at its switch are the ones that learn.
        var flags = bucketFlags
        var next = pending
        if var change = next {
            if failed.contains(slot) { change.failed.insert(slot) } else { change.failed.remove(slot) }
            let target = change.effective
            var newlyLearning = false
            for bucket in flags.indices {
                let learn = tracksFlows && target[bucket] != table[bucket]
                if learn && flags[bucket] & UInt32(RP_BUCKET_LEARN) == 0 { newlyLearning = true }
                flags[bucket] = (flags[bucket] & UInt32(RP_BUCKET_PINNED)) | (learn ? UInt32(RP_BUCKET_LEARN) : 0)
            }
            // A bucket that starts learning now gets a whole idle timeout to see its live flows.
            if newlyLearning {
                let window = Int64(options.tracking.idleTimeoutMs) * 1_000_000
                change.switchNs = max(change.switchNs, MonotonicClock.nanoseconds() + window)
            }
            next = change
        }
        try writeEffective(table, flags: flags)
        if let next { try maps.writeNextBuckets(next.effective) }
        failedOver = failed
        pending = next
        if pending != nil { try persist(now: MonotonicClock.nanoseconds()) }
        return moved
    }

    /// Takes the slot's sockets out of the arrays and closes them; its flows fall back. The
    /// fallback table stops naming the slot first.
    public func closeSlot(_ slot: UInt32) throws {
        try spreadFallback(over: liveSlots.filter { $0 != slot })
        try removeSockets(slot)
    }

    /// Puts a fresh socket at `slot` on every listener (after `closeSlot`, or to replace one).
    public func reopenSlot(_ slot: UInt32) throws {
        if listeners.contains(where: { $0.sockets[slot] != nil }) { try closeSlot(slot) }
        try insertSockets(slot)
        try spreadFallback(over: liveSlots)
    }

    // MARK: placement changes that keep live flows (transitions)

    /// Takes new tracking settings (not `maxFlows`: rp_flows is sized at load).
    /// While a change runs, the new settings wait for its end: the change keeps the idle timeout,
    /// drain timeout and rate it started with.
    public func setTracking(_ tracking: FlowTracking) throws {
        var tracking = tracking
        tracking.maxFlows = options.tracking.maxFlows
        guard transitionStartedNs == nil else {
            deferredTracking = tracking
            return
        }
        options.tracking = tracking
        try spreadFallback(over: fallbackSlots)
    }

    /// Settings given while a change ran, applied when it ends.
    private var deferredTracking: FlowTracking?

    /// Whether changes of this plane learn and pin flows: tracking on and a UDP listener (a TCP
    /// connection, once accepted, never moves: SYNs simply follow the table).
    public var tracksFlows: Bool {
        options.tracking.enabled && listeners.contains { $0.endpoint.transport == .udp }
    }

    /// The slots the fallback table may name: holding a socket, and neither leaving nor about
    /// to leave at the switch.
    private var fallbackSlots: [UInt32] { fallbackSlots(staying: pending?.slots ?? slots) }

    private func fallbackSlots(staying: [UInt32]) -> [UInt32] {
        let staying = Set(staying)
        return liveSlots.filter { staying.contains($0) && !leaving.contains($0) }
    }

    /// Starts (or extends) a change to `count` slots, 0..<count. New slots get their sockets now
    /// and take new flows from the switch on; until then the buckets that will move record the
    /// flows they see (learning, for one idle timeout, `learnNs`). Slots beyond `count` leave the
    /// fallback table at once and retire after the switch, once drained. Returns the plan.
    ///
    /// A change while another learns replaces its target and learns again for `learnNs`: records
    /// made so far stay. A change while another drains starts learning on top of it: pinned
    /// buckets stay pinned. With `learnNs` 0 (or tracking off) nothing is learned: `advance`
    /// switches at its next call.
    @discardableResult
    public func beginResize(to count: Int, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        if let generation = pendingGeneration {
            throw ReuseportError.invalidArgument("generation \(generation) is learning the live flows it takes over: "
                + "scale once it switched")
        }
        let base = pending ?? PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now)
        let target = try targetSlots(resizing: base.slots, to: count)
        let next = PendingPlacement(buckets: BucketAssignment.rebalance(base.buckets, to: target), slots: target,
                                    failed: base.failed.intersection(target), switchNs: now)
        let added = target.filter { !liveSlots.contains($0) }
        let wasLeaving = leaving
        do {
            for slot in added { try insertSockets(slot) }
            leaving.subtract(target)
            return try plan(next, now: now, learnNs: learnNs)
        } catch {
            leaving = wasLeaving
            try? spreadFallback(over: fallbackSlots)
            for slot in added { try? removeSockets(slot) }
            throw error
        }
    }

    /// Starts giving a failed-over slot its buckets back as a change: the flows the other slots
    /// took over while it was down are recorded and stay there; new flows go to the slot from the
    /// switch on. Without tracking, as `restore(_:)`.
    @discardableResult
    public func beginRestore(_ slot: UInt32, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        let base = pending ?? PendingPlacement(buckets: buckets, slots: slots, failed: failedOver, switchNs: now)
        var next = base
        next.failed.remove(slot)
        return try plan(next, now: now, learnNs: learnNs)
    }

    /// The slots of a change to `count` slots from `base`: the lowest `count` of them when
    /// shrinking; when growing, `base` and the lowest indices held by no other generation (a
    /// leaving slot of the working generation may join again: its worker runs the same program).
    public func targetSlots(resizing base: [UInt32], to count: Int) throws -> [UInt32] {
        _ = try SlotCount(count)
        let sorted = base.sorted()
        guard count > sorted.count else { return Array(sorted.prefix(count)) }
        var target = Set(sorted)
        let starting = Set(startingGeneration?.slots ?? [])
        for candidate in 0..<UInt32(RP_MAX_SLOTS) where target.count < count {
            guard !target.contains(candidate), !starting.contains(candidate) else { continue }
            if let generation = slotGenerations[candidate], generation != workingGeneration { continue }
            target.insert(candidate)
        }
        guard target.count == count else {
            throw ReuseportError.invalidArgument("no room for \(count) slots: older generations still hold slots, "
                + "and a service has at most \(RP_MAX_SLOTS)")
        }
        return target.sorted()
    }

    // MARK: a rebuild (reload) that keeps the placement

    /// Takes the placement of `old`, the plane a reload rebuilds, on this plane built beside it
    /// and not attached yet (nothing steers through it, so the order of these writes does not
    /// matter): the slots that hold sockets there and the generation of each, the bucket table,
    /// the fallback table, and the change in progress (pending placement, each bucket's learn and
    /// pinned flags, leaving slots, drain deadline, the idle timeout it runs with) with its flow
    /// records. Once attached, every flow goes to the slot it went to before, and the change goes
    /// on here; a fresh plane's even table would move about (N−1)/N of the flows of a table that
    /// a scale left.
    ///
    /// Only with the same bucket count and seed (otherwise a flow's bucket is another one, and
    /// flows move by nature): returns false then, and changes nothing. Not carried: the slots of a
    /// generation still starting (no flow reached them), failover (every slot gets a new worker:
    /// a failed-over slot's buckets go back to it), and a generation change learning its flows,
    /// which goes on as a change within the working generation (a rebuild starts the file's
    /// definition on every slot of the working and pending generations). Slots of an older
    /// generation keep its number; the others are in the working one. Called once
    /// `continueGenerations` numbered this plane's working generation. Records are copied again
    /// just before the switch (`copyRecords`): the old program makes them until then.
    @discardableResult
    public func carryPlacement(from old: ServiceDataPlane, now: Int64) throws -> Bool {
        guard old.options.bucketCount == options.bucketCount, old.options.seed == options.seed else { return false }
        let starting = Set(old.startingGeneration?.slots ?? [])
        let carried = old.liveSlots.filter { !starting.contains($0) }
        let current: Set<UInt32> = [old.workingGeneration, old.pendingGeneration ?? old.workingGeneration]
        // Sockets first at the slots that are new here, then away from the others: a listener
        // bound with port 0 keeps its port through a socket bound to it.
        for slot in carried {
            let generation = old.slotGenerations[slot].map { current.contains($0) ? workingGeneration : $0 }
            try insertSockets(slot, generation: generation ?? workingGeneration)
        }
        for slot in liveSlots where !carried.contains(slot) { try removeSockets(slot) }
        slots = old.slots
        buckets = old.buckets
        failedOver = []
        effectiveBuckets = BucketAssignment.overlay(buckets, slots: slots, failed: [])
        bucketFlags = old.bucketFlags
        pending = old.pending.map { PendingPlacement(buckets: $0.buckets, slots: $0.slots, failed: [], switchNs: $0.switchNs) }
        leaving = old.leaving
        drainDeadlineNs = old.drainDeadlineNs
        transitionStartedNs = old.transitionStartedNs
        if transitionStartedNs != nil {
            // The change finishes with the settings it started with; the file's (this plane's)
            // apply after it. rp_flows is this plane's, sized by the file.
            var running = old.options.tracking
            running.maxFlows = options.tracking.maxFlows
            if running != options.tracking {
                deferredTracking = options.tracking
                options.tracking = running
            }
        }
        try maps.writeChanging(bucketFlags.contains { $0 != 0 })
        try maps.writeBuckets(zip(effectiveBuckets, bucketFlags).map { $0 | $1 })
        if let pending { try maps.writeNextBuckets(pending.effective) }
        try maps.writeFallback(old.fallback)
        fallback = old.fallback
        try spreadFallback(over: fallbackSlots)
        try copyRecords(from: old)
        try persist(now: now)
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

    /// Generations older than the working one that may hold slots at once. Each keeps its
    /// workers and sockets while its flows live; a bound keeps a run of bad deploys from piling
    /// up processes. Beyond it a new generation is refused, with the reason, until one retires.
    public static let maxDrainingGenerations = 3

    /// Takes the generation counter a previous plane of the service reached (its pins, or the
    /// plane a reload replaces): numbers go on from there, and the working generation keeps its
    /// number. Only before any other generation started on this plane.
    public func continueGenerations(working: UInt32, last: UInt32) throws {
        guard startingGeneration == nil, Set(slotGenerations.values).count <= 1 else {
            throw ReuseportError.invalidArgument("the generations of this plane have started already")
        }
        workingGeneration = max(working, 1)
        lastGeneration = max(last, workingGeneration)
        for slot in slotGenerations.keys { slotGenerations[slot] = workingGeneration }
        try persist(now: MonotonicClock.nanoseconds())
    }

    /// Starts a new generation of `count` slots beside the working one: the next number, and
    /// sockets at the lowest indices no slot holds. Nothing steers to them yet: no bucket and no
    /// fallback entry names them until `switchGeneration`, so a generation whose workers never
    /// become ready never takes a flow. Refused while a change learns or another generation starts.
    public func startGeneration(count: Int, now: Int64) throws -> StartingGeneration {
        _ = try SlotCount(count)
        if let starting = startingGeneration {
            throw ReuseportError.invalidArgument("generation \(starting.generation) is starting already")
        }
        guard pending == nil else {
            throw ReuseportError.invalidArgument("a placement change is learning its live flows: start the "
                + "generation once it switched")
        }
        let draining = Set(slotGenerations.values).subtracting([workingGeneration]).sorted()
        guard draining.count < Self.maxDrainingGenerations else {
            throw ReuseportError.invalidArgument("generations \(draining.map(String.init).joined(separator: ", ")) "
                + "still drain, and at most \(Self.maxDrainingGenerations) may: start the next once one has retired "
                + "(its flows idle, or at drain_timeout_ms)")
        }
        let held = Set(liveSlots)
        let free = (0..<UInt32(RP_MAX_SLOTS)).lazy.filter { !held.contains($0) }.prefix(count)
        guard free.count == count else {
            throw ReuseportError.invalidArgument("no room for \(count) more slots beside the \(held.count) held "
                + "(a service has at most \(RP_MAX_SLOTS)); wait until older generations have drained")
        }
        let generation = lastGeneration &+ 1
        let added = Array(free)
        do {
            for slot in added { try insertSockets(slot, generation: generation) }
        } catch {
            for slot in added where listeners.contains(where: { $0.sockets[slot] != nil }) { try? removeSockets(slot) }
            throw error
        }
        lastGeneration = generation
        startingGeneration = StartingGeneration(generation: generation, slots: added)
        try persist(now: now)
        return startingGeneration!
    }

    /// Gives up the starting generation: its sockets leave the arrays and close. No flow was
    /// ever steered to them; its number is not given out again.
    public func abandonGeneration(now: Int64) throws {
        guard let starting = startingGeneration else { return }
        startingGeneration = nil
        for slot in starting.slots { try removeSockets(slot) }
        try persist(now: now)
    }

    /// Makes the starting generation the working one, as a placement change of every bucket:
    /// for one idle timeout every bucket learns the live flows of the slots it names now, then
    /// all switch to the new generation's slots (balanced), and the old slots leave, each
    /// retiring once its recorded flows are idle (`sweep`, `retire`), as in a scale-down.
    @discardableResult
    public func switchGeneration(now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        guard let starting = startingGeneration else {
            throw ReuseportError.invalidArgument("no generation is starting")
        }
        let plan = try changeGeneration(to: starting.slots, generation: starting.generation, now: now, learnNs: learnNs)
        startingGeneration = nil
        try persist(now: now)
        return plan
    }

    /// Makes a generation whose slots are still leaving (draining since a switch) the working one
    /// again: from the switch on its slots take the new flows, and the generation working now
    /// leaves, its live flows recorded while learning and kept until idle.
    @discardableResult
    public func rollBack(to generation: UInt32, now: Int64, learnNs: Int64? = nil) throws -> TransitionPlan {
        guard startingGeneration == nil, pending == nil else {
            throw ReuseportError.invalidArgument("a generation is starting or a change is learning: roll back once it switched")
        }
        let target = liveSlots.filter { slotGenerations[$0] == generation && leaving.contains($0) }
        guard !target.isEmpty, generation != workingGeneration else {
            throw ReuseportError.invalidArgument("generation \(generation) has no slot left to roll back to")
        }
        return try changeGeneration(to: target, generation: generation, now: now, learnNs: learnNs)
    }

    private func changeGeneration(to target: [UInt32], generation: UInt32, now: Int64, learnNs: Int64?) throws
        -> TransitionPlan
    {
        let next = PendingPlacement(buckets: BucketAssignment.rebalance(buckets, to: target), slots: target,
                                    failed: [], switchNs: now)
        let wasLeaving = leaving
        leaving.subtract(target)
        do {
            let plan = try plan(next, now: now, learnNs: learnNs)
            pendingGeneration = generation
            return plan
        } catch {
            leaving = wasLeaving
            try? spreadFallback(over: fallbackSlots)
            throw error
        }
    }

    /// Makes `next` the pending placement: flags the buckets that move for learning, persists
    /// the change in rp_transition and rp_next_buckets.
    private func plan(_ next: PendingPlacement, now: Int64, learnNs: Int64?) throws -> TransitionPlan {
        var next = next
        let learn = tracksFlows ? (learnNs ?? Int64(options.tracking.idleTimeoutMs) * 1_000_000) : 0
        next.switchNs = now + learn
        let target = next.effective
        var flags = bucketFlags
        var moving = 0
        for bucket in flags.indices {
            let moves = target[bucket] != effectiveBuckets[bucket]
            if moves { moving += 1 }
            flags[bucket] = (flags[bucket] & UInt32(RP_BUCKET_PINNED)) | (moves && learn > 0 ? UInt32(RP_BUCKET_LEARN) : 0)
        }
        let records = try liveRecordsBySlot(now: now)
        let leavingAtSwitch = Set(liveSlots).subtracting(next.slots).subtracting(startingGeneration?.slots ?? [])
        // Flows a full table turned away in an earlier change may be recorded in this one.
        if learn > 0 { try clearUntrackedMarkers() }
        // The kernel's tables first; this plane's state once they are written.
        try spreadFallback(over: fallbackSlots(staying: next.slots))
        try writeEffective(effectiveBuckets, flags: flags)
        // The table the switch writes, failover included: what a daemon started again switches to.
        try maps.writeNextBuckets(target)
        pending = next
        if transitionStartedNs == nil { transitionStartedNs = now }
        try persist(now: now)
        return TransitionPlan(movingBuckets: moving, bucketCount: options.bucketCount, switchNs: next.switchNs,
                              leaving: leavingAtSwitch.sorted(),
                              recordedFlowsOnLeaving: leavingAtSwitch.reduce(0) { $0 + (records[$1] ?? 0) })
    }

    /// Switches a pending change whose learning is over (or any, with `force`): every bucket
    /// takes its new slot, and those that moved are pinned in the same write, so a recorded
    /// flow never sees its bucket's new slot. Returns the buckets moved, nil when nothing was
    /// due. With `drainNow`, the leaving slots' deadline is now.
    @discardableResult
    public func advance(now: Int64, force: Bool = false, drainNow: Bool = false) throws -> Int? {
        guard let next = pending, force || now >= next.switchNs else { return nil }
        let target = next.effective
        var flags = bucketFlags
        var moved = 0
        for bucket in flags.indices {
            let pinned = flags[bucket] & UInt32(RP_BUCKET_PINNED)
            if target[bucket] != effectiveBuckets[bucket] {
                moved += 1
                flags[bucket] = tracksFlows ? UInt32(RP_BUCKET_PINNED) : 0
            } else {
                flags[bucket] = pinned
            }
        }
        try writeEffective(target, flags: flags)
        buckets = next.buckets
        slots = next.slots
        failedOver = next.failed
        pending = nil
        if let generation = pendingGeneration { workingGeneration = generation }
        pendingGeneration = nil
        leaving.formUnion(Set(liveSlots).subtracting(slots).subtracting(startingGeneration?.slots ?? []))
        // The drain timeout bounds how long leaving slots wait; records of staying slots keep
        // their flows until those are idle, however long that takes.
        let drainMs = options.tracking.drainTimeoutMs
        drainDeadlineNs = drainNow || !tracksFlows ? now : (drainMs > 0 ? now + Int64(drainMs) * 1_000_000 : nil)
        try spreadFallback(over: fallbackSlots)
        try persist(now: now)
        return moved
    }

    /// Takes a leaving slot's sockets out of the arrays and out of this plane, open (in listener
    /// order), for the caller to drain and close. Its recorded flows, if any are left, follow
    /// the table from now on.
    public func retire(_ slot: UInt32, now: Int64) throws -> [ReuseportSocket] {
        guard leaving.contains(slot) else {
            throw ReuseportError.invalidArgument("slot \(slot) is not leaving")
        }
        let sockets = try takeSockets(slot)
        leaving.remove(slot)
        try persist(now: now)
        return sockets
    }

    /// Live records by slot: read every record, delete those idle longer than the idle timeout
    /// and those naming a slot in `forget` (a failed-over slot: its flows have no worker).
    /// Once no change is pending or leaving and no record is live, the change is over: the
    /// pinned flags are cleared and the untracked markers removed.
    public func sweep(now: Int64, forget: Set<UInt32> = []) throws -> SweepResult {
        let idleNs = UInt64(options.tracking.idleTimeoutMs) * 1_000_000
        let clock = UInt64(now)
        // A record naming a slot that holds no socket (retired at the drain timeout) steers
        // nothing any more: it goes too, so that the change can end.
        let holding = Set(liveSlots)
        var live: [UInt32: Int] = [:]
        var expired = 0
        // Raw entries: a sweep of a million records must not build a million FlowTuples.
        var stale: [rp_flow_key] = []
        try maps.flows.forEachEntry(as: (rp_flow_key, rp_flow).self) { key, record in
            let idle = clock > record.last_seen_ns ? clock - record.last_seen_ns : 0
            if idle > idleNs || forget.contains(record.slot) || !holding.contains(record.slot) {
                stale.append(key)
            } else {
                live[record.slot, default: 0] += 1
            }
        }
        // Deleted after the walk: a batch walk over a hash table that changes under it may skip
        // or repeat a bucket.
        for key in stale where try maps.flows.delete(key: key) { expired += 1 }
        var finished = false
        if pending == nil, leaving.isEmpty, transitionStartedNs != nil, live.isEmpty {
            try endTransition(now: now)
            finished = true
        }
        return SweepResult(liveBySlot: live, expired: expired, finished: finished)
    }

    /// Live records by slot, without deleting anything.
    public func liveRecordsBySlot(now: Int64) throws -> [UInt32: Int] {
        let idleNs = UInt64(options.tracking.idleTimeoutMs) * 1_000_000
        let clock = UInt64(now)
        var live: [UInt32: Int] = [:]
        try maps.flows.forEachEntry(as: (rp_flow_key, rp_flow).self) { _, record in
            let seen = record.last_seen_ns
            if clock <= seen || clock - seen <= idleNs { live[record.slot, default: 0] += 1 }
        }
        return live
    }

    /// Clears every pinned flag and every record: the table alone decides again.
    private func endTransition(now: Int64) throws {
        try writeEffective(effectiveBuckets, flags: Array(repeating: 0, count: bucketFlags.count))
        for (key, _) in try maps.flows.entries(as: (rp_flow_key, rp_flow).self) { try maps.flows.delete(key: key) }
        try clearUntrackedMarkers()
        transitionStartedNs = nil
        drainDeadlineNs = nil
        if let deferred = deferredTracking {
            deferredTracking = nil
            options.tracking = deferred
            try spreadFallback(over: fallbackSlots)
        }
        try persist(now: now)
    }

    private func clearUntrackedMarkers() throws {
        var keys: [rp_flow_key] = []
        try maps.untracked.forEachEntry(as: (rp_flow_key, UInt32).self) { key, _ in keys.append(key) }
        for key in keys { try maps.untracked.delete(key: key) }
    }

    /// Writes rp_transition: what a daemon started again needs to finish the change, and, change
    /// or not, which slots it must look at.
    private func persist(now: Int64) throws {
        var state = rp_transition()
        // Kept with or without a change: once a generation change has ended, the slots in use
        // are not 0..<slot_count (the new generation's may be 4..7), and a daemon started on
        // these pins adopts the workers of every slot below this bound and none above it.
        state.socket_slots = liveSlots.max().map { $0 + 1 } ?? 0
        if let started = transitionStartedNs {
            state.phase = pending != nil ? RP_TRANSITION_LEARNING.rawValue : RP_TRANSITION_DRAINING.rawValue
            state.slots_after = UInt32((pending?.slots ?? slots).count)
            state.moving_buckets = UInt32(bucketFlags.filter { $0 != 0 }.count)
            state.started_ns = UInt64(started)
            state.switch_ns = UInt64(pending?.switchNs ?? 0)
            state.drain_deadline_ns = UInt64(drainDeadlineNs ?? 0)
            state.idle_timeout_ns = UInt64(options.tracking.idleTimeoutMs) * 1_000_000
        }
        state.working_generation = workingGeneration
        state.last_generation = lastGeneration
        try maps.writeTransition(state)
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
    public func close() {
        for listener in listeners {
            for socket in listener.sockets.values { socket.close() }
            listener.sockets.removeAll()
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

    public init(buckets: [UInt32], slots: [UInt32], failed: Set<UInt32>, switchNs: Int64) {
        self.buckets = buckets
        self.slots = slots
        self.failed = failed
        self.switchNs = switchNs
    }

    /// The table rp_buckets will hold: the failed-over slots' buckets lent to the others.
    public var effective: [UInt32] { BucketAssignment.overlay(buckets, slots: slots, failed: failed) }
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
