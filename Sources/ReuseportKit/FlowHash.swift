import CReuseportABI

/// A flow as the steering program sees it: the packet's addresses and ports.
public struct FlowTuple: Hashable, Sendable, CustomStringConvertible {
    public var transport: Transport
    public var source: SocketAddress
    public var destination: SocketAddress

    /// IPv4-mapped IPv6 addresses are taken as the IPv4 addresses they map: a client of a
    /// dual-stack socket sends an IPv4 packet, and that is what the program hashes.
    public init(_ transport: Transport, from source: SocketAddress, to destination: SocketAddress) {
        self.transport = transport
        self.source = SocketAddress(source.address.unmapped, source.port)
        self.destination = SocketAddress(destination.address.unmapped, destination.port)
    }

    public var description: String { "\(transport) \(source) -> \(destination)" }
}

/// The flow hash of bpf/dispatch.h, called from Swift: the same C functions the BPF program
/// compiles (rp_flow_hash, rp_fallback_index), so the prediction cannot drift from the
/// program. The test vectors in bpf/testdata/flow-hash-vectors.txt pin the hash itself.
public enum FlowHash {
    /// The flow's addresses as the program loads them (source then destination, network
    /// order, 2 words for IPv4, 8 for IPv6) and its ports word (source << 16 | destination).
    static func inputs(of flow: FlowTuple) -> (addresses: [UInt32], ports: UInt32) {
        var words = [UInt32](repeating: 0, count: 8)
        let bytes = flow.source.address.bytes + flow.destination.address.bytes
        words.withUnsafeMutableBytes { $0.copyBytes(from: bytes) }
        return (words, UInt32(flow.source.port) << 16 | UInt32(flow.destination.port))
    }

    public static func hash(_ flow: FlowTuple, seed: UInt32) -> UInt32 {
        let (addresses, ports) = inputs(of: flow)
        return rp_flow_hash(seed, UInt32(flow.transport.ipProtocol), flow.source.address.isV4 ? 0 : 1, addresses, ports)
    }

    /// The bucket of a hash: hash mod count, as the program computes it (a mask when count is
    /// a power of two, which gives the same result).
    public static func bucket(hash: UInt32, count: UInt32) -> UInt32 { hash % count }

    /// The first rp_fallback entry the program tries for a flow whose slot is empty.
    public static func fallbackIndex(hash: UInt32) -> UInt32 { rp_fallback_index(hash) }
}
