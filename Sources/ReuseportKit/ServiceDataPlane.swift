import CReuseportABI

/// The steering data plane of one service: for each listener a reuseport group of one
/// socket per slot, its program attached, the socket array filled; one bucket table
/// and one configuration for all listeners.
///
/// It owns the sockets: a slot's socket outlives any worker that serves it, which is
/// what lets a replacement worker take over the same socket (and the datagrams queued
/// in it) without moving a single flow.
public final class ServiceDataPlane: @unchecked Sendable {
    public struct Options: Sendable {
        public var bucketCount: Int
        public var seed: UInt32
        public var receiveBuffer: Int?
        public var v6Only: Bool

        public init(bucketCount: Int = Int(RP_DEFAULT_BUCKETS), seed: UInt32 = 0, receiveBuffer: Int? = nil,
                    v6Only: Bool = true) {
            self.bucketCount = bucketCount
            self.seed = seed
            self.receiveBuffer = receiveBuffer
            self.v6Only = v6Only
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
    public let maps: DispatchMaps
    public let listeners: [Listener]
    /// The table last written to rp_buckets.
    public private(set) var buckets: [UInt32]
    /// Slot indices in use (each with one socket per listener).
    public private(set) var slots: [UInt32]

    /// Binds `slotCount` sockets on each endpoint, loads and attaches the program, fills the
    /// arrays and writes the configuration and an even bucket table.
    public init(endpoints: [Endpoint], slotCount: Int, options: Options = Options()) throws {
        guard !endpoints.isEmpty else { throw ReuseportError.invalidArgument("a service needs at least one listener") }
        guard (1...Int(RP_MAX_SLOTS)).contains(slotCount) else {
            throw ReuseportError.invalidArgument("slot count \(slotCount) is outside 1...\(RP_MAX_SLOTS)")
        }
        guard (1...Int(RP_MAX_BUCKETS)).contains(options.bucketCount) else {
            throw ReuseportError.invalidArgument("bucket count \(options.bucketCount) is outside 1...\(RP_MAX_BUCKETS)")
        }
        self.options = options
        var listeners: [Listener] = []
        var shared: DispatchMaps?
        for requested in endpoints {
            let program = try DispatchProgram(sharing: shared)
            shared = shared ?? program.maps
            // The first socket fixes the port (when 0 was asked); the others join its group.
            let first = try ReuseportSocket(endpoint: requested, receiveBuffer: options.receiveBuffer,
                                            v6Only: options.v6Only)
            try first.attach(program)
            let listener = Listener(endpoint: first.endpoint, program: program)
            listener.sockets[0] = first
            listeners.append(listener)
        }
        self.maps = shared!
        self.listeners = listeners
        self.slots = []
        self.buckets = []
        for slot in 0..<UInt32(slotCount) { try openSlot(slot) }
        slots = Array(0..<UInt32(slotCount))
        buckets = BucketAssignment.initial(bucketCount: options.bucketCount, slots: slots)
        try maps.writeBuckets(buckets)
        try maps.writeConfig(seed: options.seed, bucketCount: options.bucketCount, slotCount: slotCount)
    }

    /// Binds (if not yet bound) and inserts the slot's socket on every listener.
    private func openSlot(_ slot: UInt32) throws {
        try maps.resetSlotCounters(slot)
        for listener in listeners {
            let socket = try listener.sockets[slot]
                ?? ReuseportSocket(endpoint: listener.endpoint, receiveBuffer: options.receiveBuffer,
                                   v6Only: options.v6Only)
            listener.sockets[slot] = socket
            try listener.program.sockets.insert(socket, at: slot)
        }
    }

    /// The sockets of `slot`, one per listener, in listener order: what its worker gets.
    public func sockets(ofSlot slot: UInt32) -> [ReuseportSocket] {
        listeners.compactMap { $0.sockets[slot] }
    }

    /// Changes the number of slots to `count` (slots 0..<count), moving the fewest buckets.
    /// New slots' sockets are bound and inserted before any bucket points at them; removed
    /// slots lose their buckets before their sockets leave the arrays and close.
    /// Returns the number of buckets that moved.
    ///
    /// If binding or inserting a new slot's socket or writing the table fails, the table is
    /// written back and the new slots' sockets leave the arrays and close before the error is
    /// thrown: a socket left in an array would make the next insert at its slot fail with EBUSY.
    ///
    /// - Parameters:
    ///   - written: makes the table written to rp_buckets from the new `buckets` (by default the
    ///     same). The daemon lays its failover over it here, so that no write ever gives a
    ///     failed-over slot its buckets back. It may name only slots below `count`.
    ///   - current: the table rp_buckets holds now, if not `buckets` (the daemon's failover).
    @discardableResult
    public func resize(to count: Int, written: ([UInt32]) -> [UInt32] = { $0 }, current: [UInt32]? = nil) throws
        -> Int
    {
        guard (1...Int(RP_MAX_SLOTS)).contains(count) else {
            throw ReuseportError.invalidArgument("slot count \(count) is outside 1...\(RP_MAX_SLOTS)")
        }
        let target = Array(0..<UInt32(count))
        let previous = buckets
        let inKernel = current ?? buckets
        let table = BucketAssignment.rebalance(buckets, to: target)
        let writing = written(table)
        guard writing.count == options.bucketCount, writing.allSatisfy({ $0 < UInt32(count) }) else {
            throw ReuseportError.invalidArgument("the table to write must have \(options.bucketCount) entries, all below \(count)")
        }
        let added = target.filter { !slots.contains($0) }
        do {
            for slot in added { try openSlot(slot) }
            try maps.writeBuckets(writing, previous: inKernel)
        } catch {
            // A failed write may have left part of the new table: write all of the old one.
            try? maps.writeBuckets(inKernel)
            for slot in added { try? closeSlot(slot) }
            throw error
        }
        buckets = table
        let removed = slots.filter { $0 >= UInt32(count) }
        // slot_count shrinks only after no bucket names a removed slot.
        try maps.writeConfig(seed: options.seed, bucketCount: options.bucketCount, slotCount: count)
        for slot in removed { try closeSlot(slot) }
        slots = target
        return BucketAssignment.moved(from: previous, to: table)
    }

    /// Writes a new bucket table (only the entries that change).
    public func setBuckets(_ table: [UInt32]) throws {
        guard table.count == options.bucketCount else {
            throw ReuseportError.invalidArgument("bucket table has \(table.count) entries, expected \(options.bucketCount)")
        }
        try maps.writeBuckets(table, previous: buckets)
        buckets = table
    }

    /// Takes the slot's sockets out of the arrays and closes them (its flows fall back).
    public func closeSlot(_ slot: UInt32) throws {
        for listener in listeners {
            try listener.program.sockets.remove(at: slot)
            listener.sockets.removeValue(forKey: slot)?.close()
        }
    }

    /// Puts a fresh socket at `slot` on every listener (after `closeSlot`, or to replace one).
    public func reopenSlot(_ slot: UInt32) throws {
        for listener in listeners { listener.sockets.removeValue(forKey: slot)?.close() }
        try openSlot(slot)
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
