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

/// The flow hash of bpf/dispatch.h, in Swift: MurmurHash3 (x86_32) over 32-bit words with
/// the configured seed, finished with fmix32. Bit-identical to the BPF program; the test
/// vectors in bpf/testdata/flow-hash-vectors.txt hold both to it.
public enum FlowHash {
    /// The words hashed: tag (ip version << 8 | protocol), source address, destination
    /// address (big-endian words), then source port << 16 | destination port.
    public static func words(of flow: FlowTuple) -> [UInt32] {
        let version: UInt32 = flow.source.address.isV4 ? 4 : 6
        var words = [version << 8 | UInt32(flow.transport.ipProtocol)]
        for address in [flow.source.address, flow.destination.address] {
            let bytes = address.bytes
            for i in stride(from: 0, to: bytes.count, by: 4) {
                words.append(UInt32(bytes[i]) << 24 | UInt32(bytes[i + 1]) << 16 | UInt32(bytes[i + 2]) << 8
                             | UInt32(bytes[i + 3]))
            }
        }
        words.append(UInt32(flow.source.port) << 16 | UInt32(flow.destination.port))
        return words
    }

    public static func hash(_ flow: FlowTuple, seed: UInt32) -> UInt32 {
        hash(words: words(of: flow), seed: seed)
    }

    public static func hash(words: [UInt32], seed: UInt32) -> UInt32 {
        var h = seed
        for word in words { h = mix(h, word) }
        return finish(h, count: UInt32(words.count))
    }

    @inline(__always)
    static func rotateLeft(_ x: UInt32, _ r: UInt32) -> UInt32 { x << r | x >> (32 - r) }

    @inline(__always)
    static func mix(_ h: UInt32, _ k: UInt32) -> UInt32 {
        var k = k &* 0xcc9e_2d51
        k = rotateLeft(k, 15) &* 0x1b87_3593
        let h = rotateLeft(h ^ k, 13)
        return h &* 5 &+ 0xe654_6b64
    }

    @inline(__always)
    static func finish(_ h: UInt32, count: UInt32) -> UInt32 {
        var h = h ^ (count &* 4)
        h ^= h >> 16
        h &*= 0x85eb_ca6b
        h ^= h >> 13
        h &*= 0xc2b2_ae35
        h ^= h >> 16
        return h
    }

    /// Where the fallback probe starts for a flow whose slot is empty.
    public static func fallbackStart(hash: UInt32, slotCount: UInt32) -> UInt32 {
        slotCount == 0 ? 0 : finish(hash ^ 0x9e37_79b9, count: 1) % slotCount
    }
}
