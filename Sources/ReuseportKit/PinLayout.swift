#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI

/// Where a service's maps are pinned on bpffs:
///
///     <root>/<service>/rp_config, rp_buckets, rp_slot_stats, rp_global_stats, rp_slot_state
///     <root>/<service>/listener<i>/rp_sockets, rp_dispatch
public struct PinLayout: Sendable, Hashable {
    public static let defaultRoot = "/sys/fs/bpf/reuseportd"

    public var root: String
    public var service: String

    public init(root: String = PinLayout.defaultRoot, service: String) {
        self.root = root
        self.service = service
    }

    public var serviceDirectory: String { "\(root)/\(service)" }
    public func path(ofShared map: String) -> String { "\(serviceDirectory)/\(map)" }
    public func listenerDirectory(_ listener: Int) -> String { "\(serviceDirectory)/listener\(listener)" }
    public func path(ofSockets listener: Int) -> String { "\(listenerDirectory(listener))/\(RP_MAP_SOCKETS)" }
    public func path(ofProgram listener: Int) -> String { "\(listenerDirectory(listener))/\(RP_PROG_DISPATCH)" }

    /// The services pinned under `root`, by folder name.
    public static func services(under root: String = PinLayout.defaultRoot) -> [String] {
        BPFFilesystem.entries(of: root).filter { BPFFilesystem.isDirectory("\(root)/\($0)") }.sorted()
    }

    /// The listener indices pinned for this service.
    public func listeners() -> [Int] {
        BPFFilesystem.entries(of: serviceDirectory).compactMap { name in
            name.hasPrefix("listener") ? Int(name.dropFirst("listener".count)) : nil
        }.sorted()
    }

    /// Creates the service folder (mounting bpffs at its mount point first if needed).
    public func create(listeners: Int) throws {
        try BPFFilesystem.ensureMounted(for: root)
        try BPFFilesystem.makeDirectories(serviceDirectory)
        for listener in 0..<listeners { try BPFFilesystem.makeDirectories(listenerDirectory(listener)) }
    }

    /// Removes the service's pins and folders. Missing entries are not an error.
    public func remove() {
        for listener in listeners() {
            _ = unlink(path(ofSockets: listener))
            _ = unlink(path(ofProgram: listener))
            _ = rmdir(listenerDirectory(listener))
        }
        for name in DispatchMaps.names { _ = unlink(path(ofShared: name)) }
        _ = rmdir(serviceDirectory)
        _ = rmdir(root)  // only if no other service is left
    }
}

/// bpffs: is it mounted, mount it, make folders on it.
public enum BPFFilesystem {
    public static let mountPoint = "/sys/fs/bpf"

    /// True if `path` is on a bpf filesystem.
    public static func isBPF(_ path: String) -> Bool {
        var fs = statfs()
        return statfs(path, &fs) == 0 && UInt(bitPattern: Int(fs.f_type)) == UInt(BPF_FS_MAGIC)
    }

    /// Mounts bpffs at /sys/fs/bpf when `root` lies under it and it is not mounted yet.
    public static func ensureMounted(for root: String) throws {
        if isBPF(mountPoint) || !root.hasPrefix(mountPoint) { return }
        if mount("bpf", mountPoint, "bpf", 0, nil) != 0 {
            throw ReuseportError.system("mount(bpf, \(mountPoint))", errno)
        }
    }

    static func makeDirectories(_ path: String) throws {
        var current = ""
        for component in path.split(separator: "/") {
            current += "/\(component)"
            if mkdir(current, 0o700) != 0 && errno != EEXIST {
                throw ReuseportError.system("mkdir(\(current))", errno)
            }
        }
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    static func entries(of path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
