#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import SystemPackage

/// A BPF object embedded in the binary (Sources/CReuseportABI/object.c), opened with
/// libbpf for the time it takes to load it and copy out the fds to keep.
///
/// The object (and every fd libbpf holds for it) is closed when this is released, so
/// whatever outlives the load is taken with `duplicate`.
final class EmbeddedObject {
    let name: String
    let object: OpaquePointer

    /// Opens (does not load) the object at `bytes`. `name` is what errors call it.
    init(_ bytes: UnsafePointer<UInt8>, count: Int, name: String) throws {
        var options = zeroedOptions(bpf_object_open_opts())
        // LIBBPF_OPTS() is a macro Swift cannot use: set the size by hand.
        options.sz = MemoryLayout<bpf_object_open_opts>.size
        let object: OpaquePointer? = "reuseportd".withCString { objectName in
            options.object_name = objectName
            return bpf_object__open_mem(bytes, count, &options)
        }
        guard let object else { throw ReuseportError.system("bpf_object__open_mem(\(name))", errno) }
        self.name = name
        self.object = object
    }

    deinit { bpf_object__close(object) }

    /// Makes the map `mapName` use the existing map behind `fd` instead of creating one.
    func reuse(map mapName: String, fd: Int32) throws {
        let result = bpf_map__reuse_fd(try map(mapName), fd)
        if result != 0 { throw ReuseportError.system("bpf_map__reuse_fd(\(mapName))", -result) }
    }

    /// Sizes the map `mapName` before the load (bpf_map__set_max_entries).
    func setMaxEntries(map mapName: String, _ entries: UInt32) throws {
        let result = bpf_map__set_max_entries(try map(mapName), entries)
        if result != 0 { throw ReuseportError.system("bpf_map__set_max_entries(\(mapName), \(entries))", -result) }
    }

    /// Sets the `const volatile __u32` global `variable` of the object's .rodata before the load.
    /// libbpf freezes that map at load, so the verifier reads the value as a constant and never
    /// walks a branch it rules out (a helper the kernel lacks may sit there).
    func setConstant(_ variable: String, _ value: UInt32) throws {
        var map = bpf_object__next_map(object, nil)
        while let current = map,
              !(bpf_map__is_internal(current) && String(cString: bpf_map__name(current)).hasSuffix(".rodata")) {
            map = bpf_object__next_map(object, current)
        }
        guard let rodata = map, let btf = bpf_object__btf(object) else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no .rodata for \(variable)")
        }
        // The type of an internal map's value is its section (BTF_KIND_DATASEC), one entry a variable.
        let section = bpf_map__btf_value_type_id(rodata)
        guard section > 0, let type = btf__type_by_id(btf, section), let entries = btf_var_secinfos(type) else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no BTF for .rodata")
        }
        var found: btf_var_secinfo?
        for index in 0..<Int(btf_vlen(type)) {
            let info: btf_var_secinfo = entries[index]
            guard let variableType = btf__type_by_id(btf, info.type),
                  let text = btf__name_by_offset(btf, variableType.pointee.name_off)
            else { continue }
            if String(cString: text) == variable { found = info }
        }
        guard let entry = found, entry.size == 4 else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no __u32 \(variable) in .rodata")
        }
        var size = 0
        guard let initial = bpf_map__initial_value(rodata, &size), Int(entry.offset) + 4 <= size else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name): .rodata holds no \(variable)")
        }
        var bytes = [UInt8](UnsafeRawBufferPointer(start: initial, count: size))
        withUnsafeBytes(of: value) { bytes.replaceSubrange(Int(entry.offset)..<Int(entry.offset) + 4, with: $0) }
        let result = bytes.withUnsafeBytes { bpf_map__set_initial_value(rodata, $0.baseAddress, size) }
        if result != 0 { throw ReuseportError.system("bpf_map__set_initial_value(.rodata, \(variable))", -result) }
    }

    /// What the verifier said of each program of the last successful `load()`, by name.
    private(set) var verifierReports: [String: VerifierReport] = [:]

    /// Creates the maps and loads every program of the object. Each program is loaded with a
    /// verifier log of its own (statistics level, or `VerifierReport.requestedLogLevel`), so a
    /// refusal names the verifier's verdict and a success records its cost.
    func load() throws {
        var buffers: [(program: OpaquePointer, buffer: UnsafeMutablePointer<CChar>)] = []
        defer { for entry in buffers { entry.buffer.deallocate() } }
        let level = VerifierReport.requestedLogLevel
        let size = VerifierReport.logSize(level: level)
        var program = bpf_object__next_program(object, nil)
        while let current = program {
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            buffer.initialize(to: 0)
            buffers.append((current, buffer))
            // libbpf keeps the pointer until the load; it retries with a log of its own only
            // when the level is 0, so with ours it reports the kernel's answer unchanged.
            bpf_program__set_log_buf(current, buffer, size)
            bpf_program__set_log_level(current, level)
            program = bpf_object__next_program(object, current)
        }
        let loaded = bpf_object__load(object)
        let logs = buffers.map { (name: String(cString: bpf_program__name($0.program)), log: String(cString: $0.buffer),
                                  loaded: bpf_program__fd($0.program) >= 0) }
        if loaded != 0 {
            // libbpf loads the programs in order and stops at the first the kernel refuses.
            guard let refused = logs.first(where: { !$0.loaded && !$0.log.isEmpty }) else {
                throw ReuseportError.system("bpf_object__load(\(name))", -loaded)
            }
            throw ReuseportError.programRefused(
                object: name, program: refused.name, errno: -loaded,
                verdict: VerifierReport.verdict(of: refused.log),
                logPath: VerifierReport.save(refused.log, program: refused.name))
        }
        verifierReports = Dictionary(uniqueKeysWithValues: logs.map { ($0.name, VerifierReport(log: $0.log)) })
    }

    func map(_ mapName: String) throws -> OpaquePointer {
        guard let map = bpf_object__find_map_by_name(object, mapName) else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no map \(mapName)")
        }
        return map
    }

    /// An fd of its own (close-on-exec) for the loaded program `programName`.
    /// Whether `load()` loads the program `programName` (bpf_program__set_autoload).
    func setAutoload(program programName: String, _ load: Bool) throws {
        guard let program = bpf_object__find_program_by_name(object, programName) else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no program \(programName)")
        }
        let result = bpf_program__set_autoload(program, load)
        if result != 0 { throw ReuseportError.system("bpf_program__set_autoload(\(programName))", -result) }
    }

    func programFD(_ programName: String) throws -> OwnedDescriptor {
        guard let program = bpf_object__find_program_by_name(object, programName) else {
            throw ReuseportError.invalidArgument("embedded BPF object \(name) has no program \(programName)")
        }
        return try Syscall.duplicate(FileDescriptor(rawValue: bpf_program__fd(program)), atLeast: 3)
    }

    /// The loaded map `mapName`, as a `BPFMap` with an fd of its own.
    func openMap(_ mapName: String, keySize: Int, valueSize: Int) throws -> BPFMap {
        try BPFMap(owning: Syscall.duplicate(FileDescriptor(rawValue: bpf_map__fd(map(mapName))), atLeast: 3),
                   name: mapName, keySize: keySize, valueSize: valueSize)
    }
}

/// A loaded SK_REUSEPORT program that can be attached to a reuseport group.
public protocol ReuseportProgram: AnyObject {
    /// The program's fd, owned by the conforming object.
    var programFD: Int32 { get }
}

extension ReuseportProgram {
    /// Run-time statistics of the program: runs and total nanoseconds. The kernel counts
    /// only while statistics are enabled (`RunTimeStatistics.enable()` or the sysctl
    /// kernel.bpf_stats_enabled), and each run then also pays for two clock reads.
    public func runStatistics() throws -> (runs: UInt64, nanoseconds: UInt64) {
        var info = bpf_prog_info()
        var length = UInt32(MemoryLayout<bpf_prog_info>.size)
        if bpf_obj_get_info_by_fd(programFD, &info, &length) != 0 {
            throw ReuseportError.system("bpf_obj_get_info_by_fd(program fd \(programFD))", errno)
        }
        return (info.run_cnt, info.run_time_ns)
    }
}

/// The kernel's BPF run-time statistics (BPF_STATS_RUN_TIME), on while this is alive.
///
/// Needs 5.8. The kernel counts enablers: statistics stay on while any fd from
/// bpf_enable_stats() is open or the sysctl is set, so another enabler may keep them on.
public final class RunTimeStatistics: @unchecked Sendable {
    private let descriptor: OwnedDescriptor

    private init(_ descriptor: OwnedDescriptor) { self.descriptor = descriptor }

    public static func enable() throws -> RunTimeStatistics {
        let fd = bpf_enable_stats(BPF_STATS_RUN_TIME)
        if fd < 0 { throw ReuseportError.system("bpf_enable_stats(BPF_STATS_RUN_TIME)", -fd) }
        return RunTimeStatistics(OwnedDescriptor(adopting: FileDescriptor(rawValue: fd)))
    }
}
