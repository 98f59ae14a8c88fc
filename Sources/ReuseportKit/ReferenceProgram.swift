#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// `rp_dispatch` as another revision built it (the benchmarks build 746545c, the last before QUIC
/// steering and flow tracking, from git), with maps of its own: what the benchmarks measure
/// today's program against, paired, in one run. Only the maps every revision has are filled:
/// `rp_config` (bytes the caller builds from that revision's own header), `rp_buckets` and
/// `rp_sockets`.
///
/// Needs what `DispatchProgram` needs (SK_REUSEPORT, REUSEPORT_SOCKARRAY: 4.19).
public final class ReferenceProgram: ReuseportProgram, @unchecked Sendable {
    private let descriptor: OwnedDescriptor
    public var programFD: Int32 { descriptor.fd.rawValue }
    public let sockets: SocketArray

    /// Loads `rp_dispatch` from `object` (revisions from 5.14 on also have `rp_dispatch_migrate`,
    /// which is left out), writes `config` at key 0 of its rp_config and `buckets` into rp_buckets.
    public init(object bytes: UnsafePointer<UInt8>, count: Int, name: String, config: [UInt8],
                buckets: [UInt32]) throws {
        let object = try EmbeddedObject(bytes, count: count, name: name)
        try? object.setAutoload(program: RP_PROG_DISPATCH_MIGRATE, false)
        try object.load()
        descriptor = try object.programFD(RP_PROG_DISPATCH)
        sockets = try SocketArray(RP_MAP_SOCKETS, in: object)
        let configMap = try object.openMap(RP_MAP_CONFIG, keySize: 4, valueSize: config.count)
        var zero: UInt32 = 0
        let written = config.withUnsafeBytes { bpf_map_update_elem(configMap.fd, &zero, $0.baseAddress, UInt64(BPF_ANY)) }
        if written != 0 { throw ReuseportError.system("bpf_map_update_elem(\(name) \(RP_MAP_CONFIG)[0])", errno) }
        let bucketMap = try object.openMap(RP_MAP_BUCKETS, keySize: 4, valueSize: MemoryLayout<UInt32>.size)
        for (bucket, slot) in buckets.enumerated() { try bucketMap.update(UInt32(bucket), slot) }
    }
}
