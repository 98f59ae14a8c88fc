import CReuseportABI
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// The hash Swift predicts with (the C functions of bpf/dispatch.h, which the BPF program
/// compiles) against vectors printed by a C program from the same header: a change of the
/// hash, or of how Swift lays out its inputs, shows here. The placement tests then hold the
/// running program to the same hash.
@Suite(.onTestThreads) struct FlowHashTests {
    struct Vector {
        var seed: UInt32
        var flow: FlowTuple
        var hash: UInt32
        var bucket: UInt32
        var fallbackIndex: UInt32
    }

    static func vectors() throws -> [Vector] {
        let path = #filePath.split(separator: "/").dropLast(3).joined(separator: "/")
        let text = String(decoding: try Syscall.readFile("/\(path)/bpf/testdata/flow-hash-vectors.txt"), as: UTF8.self)
        return try text.split(separator: "\n").map { line in
            let f = line.split(separator: " ").map(String.init)
            return Vector(
                seed: UInt32(f[0].dropFirst(2), radix: 16)!,
                flow: FlowTuple(Transport(rawValue: f[1])!, from: try SocketAddress(parsing: f[2]),
                                to: try SocketAddress(parsing: f[3])),
                hash: UInt32(f[4].dropFirst(2), radix: 16)!,
                bucket: UInt32(f[5])!, fallbackIndex: UInt32(f[6])!)
        }
    }

    @Test func predictionMatchesTheVectors() throws {
        let vectors = try Self.vectors()
        #expect(vectors.count >= 12)
        for v in vectors {
            let hash = FlowHash.hash(v.flow, seed: v.seed)
            #expect(hash == v.hash, "\(v.flow) seed \(v.seed)")
            #expect(hash % 4096 == v.bucket)
            #expect(FlowHash.fallbackIndex(hash: hash) == v.fallbackIndex)
        }
    }

    @Test func mappedAddressesHashAsIPv4() throws {
        let mapped = FlowTuple(.udp, from: try SocketAddress(parsing: "[::ffff:10.0.0.1]:4000"),
                               to: try SocketAddress(parsing: "[::ffff:10.0.0.2]:53"))
        let plain = FlowTuple(.udp, from: try SocketAddress(parsing: "10.0.0.1:4000"),
                              to: try SocketAddress(parsing: "10.0.0.2:53"))
        #expect(FlowHash.hash(mapped, seed: 9) == FlowHash.hash(plain, seed: 9))
    }

    /// 10,000 flows over 8 slots through the bucket table: the busiest slot stays within
    /// 1.15 × the mean.
    @Test func spreadOverEightSlots() throws {
        let table = BucketAssignment.initial(bucketCount: Int(RP_DEFAULT_BUCKETS), slots: Array(0..<8))
        let snapshot = SteeringSnapshot(seed: 0x5eed, slotCount: 8, buckets: table, liveSlots: Set(0..<8))
        var perSlot = [Int](repeating: 0, count: 8)
        for i in 0..<10_000 {
            let source = SocketAddress(IPAddress(bytes: [10, UInt8(i >> 8 & 0xff), UInt8(i & 0xff), 1])!,
                                       UInt16(1024 + i % 50_000))
            let flow = FlowTuple(.udp, from: source, to: SocketAddress(.loopbackV4, 5300))
            perSlot[Int(snapshot.placement(of: flow).slot!)] += 1
        }
        let mean = 10_000.0 / 8
        let busiest = Double(perSlot.max()!)
        #expect(busiest <= 1.15 * mean, "per slot: \(perSlot)")
    }
}

#if canImport(Glibc)
import Glibc
#endif
