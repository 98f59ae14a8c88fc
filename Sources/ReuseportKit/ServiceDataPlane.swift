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
/// socket arrays, rp_slot_state, rp_quic_config) and holds what they must say:
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
        /// QUIC connection-ID steering (rp_quic_config); nil: off.
        public var quic: QuicSteering?

        public init(bucketCount: Int = Int(RP_DEFAULT_BUCKETS), seed: UInt32 = 0, receiveBuffer: Int? = nil,
                    v6Only: Bool = true, quic: QuicSteering? = nil) {
            self.bucketCount = bucketCount
            self.seed = seed
            self.receiveBuffer = receiveBuffer
            self.v6Only = v6Only
            self.quic = quic
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

    public let options: Options
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

    /// Binds `slotCount` sockets on each endpoint, loads and attaches the program, fills the
    /// arrays and writes the configuration, an even bucket table and the fallback table.
    ///
    /// With `attach` false the programs are loaded and their arrays filled but not attached:
    /// `attachPrograms()` does that later. This is how a service is rebuilt make-before-break
    /// on an address it already holds: the new sockets join the running reuseport group (one
    /// (protocol, address, port) is one group; net/core/sock_reuseport.c, reuseport_add_sock())
    /// and get no traffic while the group's program, which selects only from its own array,
    /// is the old one.
    public init(endpoints: [Endpoint], slotCount: Int, options: Options = Options(), attach: Bool = true) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        _ = try SlotCount(slotCount)
        _ = try BucketCount(options.bucketCount)
        self.options = options
        var listeners: [Listener] = []
        var shared: DispatchMaps?
        for requested in endpoints {
            let program = try DispatchProgram(sharing: shared)
            shared = shared ?? program.maps
            // The first socket fixes the port (when 0 was asked); the others join its group.
            let first = try ReuseportSocket(endpoint: requested, receiveBuffer: options.receiveBuffer,
                                            v6Only: options.v6Only)
            if attach { try first.attach(program) }
            let listener = Listener(endpoint: first.endpoint, program: program)
            listener.sockets[0] = first
            listeners.append(listener)
        }
        self.maps = shared!
        self.listeners = listeners
        self.slots = Array(0..<UInt32(slotCount))
        self.buckets = BucketAssignment.initial(bucketCount: options.bucketCount, slots: slots)
        self.effectiveBuckets = buckets
        self.fallback = BucketAssignment.initial(bucketCount: Int(RP_FALLBACK_BUCKETS), slots: slots)
        for slot in slots { try insertSockets(slot) }
        try maps.writeQuicSteering(options.quic)
        try maps.writeBuckets(buckets)
        try maps.writeFallback(fallback)
        try spreadFallback(over: liveSlots)
    }

    /// The slots that hold a socket (on the first listener; every operation here fills and
    /// empties a slot on all listeners together).
    public var liveSlots: [UInt32] { listeners[0].sockets.keys.sorted() }

    /// Binds (if not yet bound) and inserts the slot's socket on every listener. The fallback
    /// table is the caller's to spread over it.
    private func insertSockets(_ slot: UInt32) throws {
        try maps.resetSlotCounters(slot)
        for listener in listeners {
            let socket = try listener.sockets[slot]
                ?? ReuseportSocket(endpoint: listener.endpoint, receiveBuffer: options.receiveBuffer,
                                   v6Only: options.v6Only)
            listener.sockets[slot] = socket
            try listener.program.sockets.insert(socket, at: slot)
        }
    }

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
    public func handOverSockets() throws -> [UInt32: [ReuseportSocket]] {
        var taken: [UInt32: [ReuseportSocket]] = [:]
        for slot in slots { taken[slot] = try takeSockets(slot) }
        return taken
    }

    private func takeSockets(_ slot: UInt32) throws -> [ReuseportSocket] {
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
                             liveCount: live.count)
    }

    /// Writes `table` to rp_buckets (the entries that differ from `effectiveBuckets`). If a
    /// write fails, the kernel's table is not known: the whole previous table is written back.
    private func writeEffective(_ table: [UInt32]) throws {
        do {
            try maps.writeBuckets(table, previous: effectiveBuckets)
        } catch {
            try? maps.writeBuckets(effectiveBuckets)
            throw error
        }
        effectiveBuckets = table
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
        guard slots.contains(slot) else {
            throw ReuseportError.invalidArgument("slot \(slot) is not in use (slots 0...\(slots.count - 1))")
        }
        let table = BucketAssignment.overlay(buckets, slots: slots, failed: failed)
        let moved = BucketAssignment.moved(from: effectiveBuckets, to: table)
        try writeEffective(table)
        failedOver = failed
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
