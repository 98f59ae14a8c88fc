import CReuseportABI

/// One flow record of rp_flows: a UDP flow seen while its bucket was learning, with the
/// slot it went to then. While its bucket is pinned, the program keeps sending it there.
public struct FlowRecord: Sendable, Equatable {
    public var flow: FlowTuple
    public var slot: UInt32
    public var packets: UInt32
    /// CLOCK_MONOTONIC of its last packet (the program's bpf_ktime_get_ns()).
    public var lastSeenNs: UInt64

    /// How long the flow has been silent at `now` (CLOCK_MONOTONIC).
    public func idleNs(at now: UInt64) -> UInt64 { now > lastSeenNs ? now - lastSeenNs : 0 }
}

extension FlowTuple {
    /// The flow as rp_flows names it (struct rp_flow_key): the bytes the program copies out of
    /// the packet, laid out as FlowHash reads them.
    public var recordKey: rp_flow_key {
        var key = rp_flow_key()
        let (addresses, ports) = FlowHash.inputs(of: self)
        key.family = source.address.isV4 ? 4 : 6
        key.protocol = transport.ipProtocol
        key.ports = ports
        withUnsafeMutableBytes(of: &key.addrs) { raw in
            addresses.withUnsafeBytes { raw.copyMemory(from: $0) }
        }
        return key
    }

    /// The flow a record's key names; nil for a key the program would not write.
    public init?(recordKey key: rp_flow_key) {
        let transport: Transport
        switch key.protocol {
        case Transport.udp.ipProtocol: transport = .udp
        case Transport.tcp.ipProtocol: transport = .tcp
        default: return nil
        }
        let bytes = withUnsafeBytes(of: key.addrs) { Array($0) }
        let length: Int
        switch key.family {
        case 4: length = 4
        case 6: length = 16
        default: return nil
        }
        guard let source = IPAddress(bytes: Array(bytes[0..<length])),
              let destination = IPAddress(bytes: Array(bytes[length..<2 * length]))
        else { return nil }
        self.init(transport, from: SocketAddress(source, UInt16(truncatingIfNeeded: key.ports >> 16)),
                  to: SocketAddress(destination, UInt16(truncatingIfNeeded: key.ports)))
    }
}

/// Reading and expiring the records of one service's rp_flows. Reading is for everyone
/// (reuseportctl opens the pins); deleting is the data plane's (`ServiceDataPlane.sweep`).
public enum FlowRecords {
    /// Every record, read in batches.
    public static func read(_ maps: DispatchMaps) throws -> [FlowRecord] {
        try maps.flows.entries(as: (rp_flow_key, rp_flow).self).compactMap { key, value in
            FlowTuple(recordKey: key).map {
                FlowRecord(flow: $0, slot: value.slot, packets: value.packets, lastSeenNs: value.last_seen_ns)
            }
        }
    }

    /// How many records rp_flows holds, counted in batches without building them (a million
    /// records would otherwise be a million FlowTuples, for a number).
    public static func count(_ maps: DispatchMaps) throws -> Int {
        var count = 0
        try maps.flows.forEachEntry(as: (rp_flow_key, rp_flow).self) { _, _ in count += 1 }
        return count
    }

    /// The record of `flow`, if there is one.
    public static func record(of flow: FlowTuple, in maps: DispatchMaps) throws -> FlowRecord? {
        try maps.flows.lookup(key: flow.recordKey, as: rp_flow.self).map {
            FlowRecord(flow: flow, slot: $0.slot, packets: $0.packets, lastSeenNs: $0.last_seen_ns)
        }
    }

    /// Kernel memory a record costs while it exists, measured on 6.18 for this key and value
    /// (hash element header, key, value, allocator rounding): for the reports of `map dump`
    /// and the bench, not a limit.
    public static let bytesPerRecord = 128
}
