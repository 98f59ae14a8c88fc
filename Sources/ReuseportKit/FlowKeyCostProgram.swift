import CReuseportABI

/// `rp_key_cost_pinned` of bpf/flow_key_cost.bpf.c: rp_dispatch's pinned path alone, built once
/// with the 40-octet `rp_flow_key` and once with the 16-octet `rp_flow_key_ipv4`. Not part of
/// the data plane: the benchmarks (item 7) attach each in place of a listener's `rp_dispatch`,
/// on the same sockets and with the same records, to measure what a key sized per family would
/// save per pinned IPv4 packet and per record. The objects are the bench's to embed and pass in.
///
/// Needs what `DispatchProgram` needs (SK_REUSEPORT, REUSEPORT_SOCKARRAY: 4.19).
public final class FlowKeyCostProgram: ReuseportProgram, @unchecked Sendable {
    public enum Key: Sendable {
        /// `rp_flow_key`, 40 octets for either family: what rp_flows holds.
        case shared
        /// `rp_flow_key_ipv4`, 16 octets: an IPv4 flow's key sized for its family.
        case ipv4

        public var size: Int {
            switch self {
            case .shared: MemoryLayout<rp_flow_key>.size
            case .ipv4: MemoryLayout<rp_flow_key_ipv4>.size
            }
        }
    }

    public let key: Key
    private let descriptor: OwnedDescriptor
    public var programFD: Int32 { descriptor.fd.rawValue }
    /// The program's records (`RP_MAP_KEY_COST_FLOWS`), for their memory.
    public let flows: BPFMap
    private let stats: BPFMap

    /// Loads the build of `key` from `object`, with room for `records` records, selecting from
    /// `socketArray` (a listener's rp_sockets: a socket can be in one array only).
    public init(object bytes: UnsafePointer<UInt8>, count: Int, name: String, key: Key, records: Int,
                socketArray: SocketArray) throws {
        let object = try EmbeddedObject(bytes, count: count, name: name)
        try object.reuse(map: RP_MAP_KEY_COST_SOCKETS, fd: socketArray.map.fd)
        try object.setMaxEntries(map: RP_MAP_KEY_COST_FLOWS, UInt32(records))
        try object.setConstant(RP_CONST_COARSE_CLOCK, CoarseClock.isSupported ? 1 : 0)
        try object.load()
        self.key = key
        descriptor = try object.programFD(RP_PROG_KEY_COST)
        flows = try object.openMap(RP_MAP_KEY_COST_FLOWS, keySize: key.size, valueSize: MemoryLayout<rp_flow>.size)
        stats = try object.openMap(RP_MAP_KEY_COST_STATS, keySize: MemoryLayout<UInt32>.size,
                                   valueSize: MemoryLayout<rp_key_cost_stats>.size)
    }

    /// Writes records of IPv4 flows, each key as this build takes it (`.ipv4`: the first 16 octets
    /// of `rp_flow_key`); returns how many were written.
    @discardableResult
    public func insert(_ keys: [rp_flow_key], _ values: [rp_flow]) throws -> Int {
        precondition(keys.allSatisfy { $0.family == 4 }, "the flow key benchmark takes IPv4 records only")
        switch key {
        case .shared:
            return try flows.updateBatch(keys, values)
        case .ipv4:
            let short = keys.map {
                rp_flow_key_ipv4(family: $0.family, protocol: $0.protocol, reserved: $0.reserved, ports: $0.ports,
                                 addrs: ($0.addrs.0, $0.addrs.1))
            }
            return try flows.updateBatch(short, values)
        }
    }

    /// Packets sent to their recorded slot, and packets that found no record, over all CPUs.
    public func counters() throws -> rp_key_cost_stats {
        try stats.lookupPerCPU(0, as: rp_key_cost_stats.self).reduce(into: rp_key_cost_stats()) {
            $0.pinned += $1.pinned
            $0.missed += $1.missed
        }
    }
}
