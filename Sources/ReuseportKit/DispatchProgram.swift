#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// The steering program of one listener, loaded from the object embedded in the binary
/// (bpf/dispatch.bpf.c), with its own socket array and the service's shared maps.
///
/// A reuseport group is one (protocol, address, port); a service listening on several
/// has one group each, and `bpf_sk_select_reuseport()` only selects sockets of the
/// group the packet arrived on. So each listener gets its own program instance and
/// REUSEPORT_SOCKARRAY, while config, buckets, counters and worker state are created
/// once and handed to the others (`bpf_map__reuse_fd`).
///
/// Needs: SK_REUSEPORT programs and REUSEPORT_SOCKARRAY (4.19), bounded loops (5.3).
public final class DispatchProgram: @unchecked Sendable {
    /// The loaded program's fd, owned.
    public let programFD: Int32
    public let maps: DispatchMaps
    public let sockets: SocketArray

    /// Loads the program. With `shared`, the new instance uses those maps instead of
    /// creating its own (a second listener of the same service).
    public init(sharing shared: DispatchMaps? = nil) throws {
        var options = bpf_object_open_opts()
        // LIBBPF_OPTS() is a macro Swift cannot use: set the size by hand.
        options.sz = MemoryLayout<bpf_object_open_opts>.size
        let object: OpaquePointer? = "reuseportd".withCString { name in
            options.object_name = name
            return bpf_object__open_mem(rp_dispatch_object(), rp_dispatch_object_size(), &options)
        }
        guard let object else { throw ReuseportError.system("bpf_object__open_mem(dispatch.bpf.o)", errno) }
        defer { bpf_object__close(object) }

        if let shared {
            for map in shared.all {
                guard let target = bpf_object__find_map_by_name(object, map.name) else {
                    throw ReuseportError.invalidArgument("embedded BPF object has no map \(map.name)")
                }
                let result = bpf_map__reuse_fd(target, map.fd)
                if result != 0 { throw ReuseportError.system("bpf_map__reuse_fd(\(map.name))", -result) }
            }
        }
        let loaded = bpf_object__load(object)
        if loaded != 0 { throw ReuseportError.system("bpf_object__load(dispatch.bpf.o)", -loaded) }

        guard let program = bpf_object__find_program_by_name(object, RP_PROG_DISPATCH) else {
            throw ReuseportError.invalidArgument("embedded BPF object has no program \(RP_PROG_DISPATCH)")
        }
        // Keep our own copies: the object (and its fds) is closed when init returns.
        func duplicate(_ fd: Int32, _ what: String) throws -> Int32 {
            try Syscall.retrying("fcntl(F_DUPFD_CLOEXEC, \(what))") { fcntl(fd, F_DUPFD_CLOEXEC, 3) }
        }
        programFD = try duplicate(bpf_program__fd(program), RP_PROG_DISPATCH)
        do {
            maps = try DispatchMaps { name, valueSize in
                guard let map = bpf_object__find_map_by_name(object, name) else {
                    throw ReuseportError.invalidArgument("embedded BPF object has no map \(name)")
                }
                return try BPFMap(owning: duplicate(bpf_map__fd(map), name), name: name,
                                  keySize: MemoryLayout<UInt32>.size, valueSize: valueSize)
            }
            guard let socketMap = bpf_object__find_map_by_name(object, RP_MAP_SOCKETS) else {
                throw ReuseportError.invalidArgument("embedded BPF object has no map \(RP_MAP_SOCKETS)")
            }
            sockets = SocketArray(map: try BPFMap(owning: duplicate(bpf_map__fd(socketMap), RP_MAP_SOCKETS),
                                                  name: RP_MAP_SOCKETS, keySize: MemoryLayout<UInt32>.size,
                                                  valueSize: MemoryLayout<UInt64>.size))
        } catch {
            Syscall.close(programFD)
            throw error
        }
    }

    deinit { Syscall.close(programFD) }

    /// Pins this listener's program and socket array (the shared maps are pinned once,
    /// through `DispatchMaps.pin`).
    public func pin(_ layout: PinLayout, listener: Int) throws {
        try sockets.map.pin(at: layout.path(ofSockets: listener))
        if bpf_obj_pin(programFD, layout.path(ofProgram: listener)) != 0 {
            throw ReuseportError.system("bpf_obj_pin(\(layout.path(ofProgram: listener)))", errno)
        }
    }

    /// Run-time statistics of the program (needs `bpf_enable_stats` or the sysctl
    /// kernel.bpf_stats_enabled to count).
    public func runStatistics() throws -> (runs: UInt64, nanoseconds: UInt64) {
        var info = bpf_prog_info()
        var length = UInt32(MemoryLayout<bpf_prog_info>.size)
        if bpf_obj_get_info_by_fd(programFD, &info, &length) != 0 {
            throw ReuseportError.system("bpf_obj_get_info_by_fd(\(RP_PROG_DISPATCH))", errno)
        }
        return (info.run_cnt, info.run_time_ns)
    }
}
