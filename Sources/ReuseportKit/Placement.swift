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

/// What the program reads, captured at one moment: seed, bucket table, fallback table, live
/// slots.
public struct SteeringSnapshot: Sendable {
    public var seed: UInt32
    public var slotCount: UInt32
    public var buckets: [UInt32]
    /// rp_fallback, RP_FALLBACK_BUCKETS entries.
    public var fallback: [UInt32]
    /// rp_config.live_count: 0 means the program drops a flow whose slot is empty.
    public var liveCount: UInt32
    /// The slots that hold a socket in the listener's array.
    public var liveSlots: Set<UInt32>
    /// rp_config.quic: the service's QUIC connection-ID layout, nil when steering is off.
    public var quic: QuicSteering?

    public init(seed: UInt32, slotCount: UInt32, buckets: [UInt32], fallback: [UInt32], liveCount: UInt32,
                liveSlots: Set<UInt32>) {
        self.seed = seed
        self.slotCount = slotCount
        self.buckets = buckets
        self.fallback = fallback
        self.liveCount = liveCount
        self.liveSlots = liveSlots
    }

    /// A snapshot whose fallback table is the one the data plane would write for these live slots.
    public init(seed: UInt32, slotCount: UInt32, buckets: [UInt32], liveSlots: Set<UInt32>) {
        let live = liveSlots.sorted()
        self.init(seed: seed, slotCount: slotCount, buckets: buckets,
                  fallback: live.isEmpty ? [] : BucketAssignment.initial(bucketCount: Int(RP_FALLBACK_BUCKETS), slots: live),
                  liveCount: UInt32(live.count), liveSlots: liveSlots)
    }

    /// Reads a live (or pinned) service: config, buckets and fallback from `maps`, live slots
    /// from `sockets`. Every slot of the array counts, not only those below slot_count: the
    /// program selects a bucket's slot whenever it has a socket.
    public init(maps: DispatchMaps, sockets: SocketArray) throws {
        let config = try maps.readConfig()
        self.init(seed: config.seed, slotCount: config.slot_count,
                  buckets: try maps.readBuckets(count: Int(min(config.bucket_count, UInt32(RP_MAX_BUCKETS) + 1))),
                  fallback: try maps.readFallback(), liveCount: config.live_count,
                  liveSlots: try sockets.liveSlots(below: Int(RP_MAX_SLOTS)))
        quic = try maps.readQuicSteering()
    }

    /// Mirrors rp_dispatch() in bpf/dispatch.bpf.c step by step. A table of no bucket or of
    /// more than RP_MAX_BUCKETS is a bucket_count the program refuses: it drops every packet.
    public func placement(of flow: FlowTuple) -> Placement {
        placement(hash: FlowHash.hash(flow, seed: seed))
    }

    /// Where the program sends a hash (select_by_hash() in bpf/dispatch.bpf.c): the flow hash,
    /// or the hash of a QUIC long header's DCID.
    public func placement(hash: UInt32) -> Placement {
        guard BucketCount.range.contains(buckets.count) else {
            return Placement(hash: hash, bucket: 0, bucketSlot: 0, slot: nil)
        }
        let bucket = FlowHash.bucket(hash: hash, count: UInt32(buckets.count))
        let bucketSlot = rp_bucket_slot(buckets[Int(bucket)])
        var placement = Placement(hash: hash, bucket: bucket, bucketSlot: bucketSlot, slot: nil)
        if liveSlots.contains(bucketSlot) {
            placement.slot = bucketSlot
        } else if liveCount > 0, fallback.count == Int(RP_FALLBACK_BUCKETS) {
            let first = FlowHash.fallbackIndex(hash: hash)
            placement.slot = (0..<UInt32(RP_FALLBACK_TRIES)).lazy
                .map { self.fallback[Int((first + $0) & UInt32(RP_FALLBACK_BUCKETS - 1))] }
                .first { self.liveSlots.contains($0) }
        }
        return placement
    }
}

/// Where the program sends a QUIC packet (quic_dispatch() in bpf/dispatch.bpf.c).
public enum QuicPlacement: Sendable, Equatable {
    /// To the live slot its DCID's server ID names.
    case byConnectionID(slot: UInt32)
    /// A long header whose DCID names no live slot: by the hash of its DCID.
    case byDCIDHash(Placement)
    /// A short header whose DCID is not of this layout (`slot` nil) or names a slot without a
    /// socket: by the flow hash of the client's address, like any datagram.
    case byFlow(namedSlot: UInt32?)
    /// Counted and dropped (version negotiation, unparsable).
    case dropped(QuicHeader.Kind)
    /// The service has no QUIC steering: every datagram goes by its flow.
    case steeringOff
}

extension SteeringSnapshot {
    /// Mirrors quic_dispatch() for one UDP payload.
    public func quicPlacement(ofPayload payload: [UInt8]) -> QuicPlacement {
        guard let quic else { return .steeringOff }
        let header = QuicHeader(payload: payload, steering: quic)
        switch header.kind {
        case .versionNegotiation, .unparsable:
            return .dropped(header.kind)
        case .short:
            guard let slot = quic.slot(ofCID: header.dcid) else { return .byFlow(namedSlot: nil) }
            return liveSlots.contains(slot) ? .byConnectionID(slot: slot) : .byFlow(namedSlot: slot)
        case .long:
            if header.dcid.count == quic.cidLength, let slot = quic.slot(ofCID: header.dcid), liveSlots.contains(slot) {
                return .byConnectionID(slot: slot)
            }
            return .byDCIDHash(placement(hash: QuicHeader.dcidHash(header.dcid, seed: seed)))
        }
    }
}
