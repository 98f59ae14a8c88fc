import CReuseportABI

/// Where the steering program sends a flow, computed in user space from the same
/// hash and tables: what `reuseportctl which` answers.
public struct Placement: Sendable, Equatable {
    public var hash: UInt32
    public var bucket: UInt32
    /// The slot the bucket names.
    public var bucketSlot: UInt32
    /// The slot the flow lands on: `bucketSlot`, or the fallback when that is empty.
    public var slot: UInt32?
    public var isFallback: Bool { slot != nil && slot != bucketSlot }
}

/// What the program reads, captured at one moment: seed, bucket table, live slots.
public struct SteeringSnapshot: Sendable {
    public var seed: UInt32
    public var slotCount: UInt32
    public var buckets: [UInt32]
    public var liveSlots: Set<UInt32>

    public init(seed: UInt32, slotCount: UInt32, buckets: [UInt32], liveSlots: Set<UInt32>) {
        self.seed = seed
        self.slotCount = slotCount
        self.buckets = buckets
        self.liveSlots = liveSlots
    }

    /// Reads a live (or pinned) service: config and buckets from `maps`, live slots from `sockets`.
    /// Every slot of the array counts, not only those below slot_count: the program selects a
    /// bucket's slot whenever it has a socket (slot_count bounds only the fallback probe).
    public init(maps: DispatchMaps, sockets: SocketArray) throws {
        let config = try maps.readConfig()
        self.init(seed: config.seed, slotCount: config.slot_count,
                  buckets: try maps.readBuckets(count: Int(min(config.bucket_count, UInt32(RP_MAX_BUCKETS) + 1))),
                  liveSlots: try sockets.liveSlots(below: Int(RP_MAX_SLOTS)))
    }

    /// Mirrors rp_dispatch() in bpf/dispatch.bpf.c step by step. A table of no bucket or of
    /// more than RP_MAX_BUCKETS is a bucket_count the program refuses: it drops every packet.
    public func placement(of flow: FlowTuple) -> Placement {
        let hash = FlowHash.hash(flow, seed: seed)
        guard (1...Int(RP_MAX_BUCKETS)).contains(buckets.count) else {
            return Placement(hash: hash, bucket: 0, bucketSlot: 0, slot: nil)
        }
        let bucket = hash % UInt32(buckets.count)
        let bucketSlot = buckets[Int(bucket)]
        if liveSlots.contains(bucketSlot) {
            return Placement(hash: hash, bucket: bucket, bucketSlot: bucketSlot, slot: bucketSlot)
        }
        let n = min(slotCount, UInt32(RP_MAX_SLOTS))
        let start = FlowHash.fallbackStart(hash: hash, slotCount: n)
        for i in 0..<n {
            let slot = (start + i) % n
            if liveSlots.contains(slot) {
                return Placement(hash: hash, bucket: bucket, bucketSlot: bucketSlot, slot: slot)
            }
        }
        return Placement(hash: hash, bucket: bucket, bucketSlot: bucketSlot, slot: nil)
    }
}
