#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI

/// Where a service's maps are pinned on bpffs:
///
///     <root>/<service>/rp_config, rp_buckets, rp_fallback, rp_slot_stats, rp_global_stats, rp_slot_state,
///                      rp_quic_stats, rp_quic_slot_stats
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

    /// Creates the service folder (mounting bpffs at its mount point first if needed). The pin
    /// root and every folder below it are made mode 0700 and must be real folders that only
    /// root (or this process's user) can change: see `TrustedPath`. An untrusted one throws
    /// `UntrustedPathError`, having pinned nothing.
    public func create(listeners: Int) throws {
        try BPFFilesystem.ensureMounted(for: root)
        try TrustedPath.makeDirectory(serviceDirectory)
        for listener in 0..<listeners { try TrustedPath.makeDirectory(listenerDirectory(listener)) }
    }

    /// Whether anything (a folder, or a link planted in its place) is at the service's folder.
    public var exists: Bool { (try? Syscall.linkStatus(serviceDirectory)) != nil }

    /// Removes the service's pins and folders. Missing entries are not an error. A symbolic link
    /// (or anything else that is not a real folder) found where a folder belongs is removed
    /// itself: nothing is ever removed through it.
    public func remove() {
        guard BPFFilesystem.isDirectory(serviceDirectory) else {
            _ = try? Syscall.removeEntry(serviceDirectory)
            _ = rmdir(root)
            return
        }
        for listener in listeners() {
            if BPFFilesystem.isDirectory(listenerDirectory(listener)) {
                _ = unlink(path(ofSockets: listener))
                _ = unlink(path(ofProgram: listener))
                _ = rmdir(listenerDirectory(listener))
            } else {
                _ = try? Syscall.removeEntry(listenerDirectory(listener))
            }
        }
        for name in DispatchMaps.names + [RP_MAP_RECORDS_VERSION, RP_MAP_LEAVING] + CanaryRecords.names {
            _ = unlink(path(ofShared: name))
        }
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

    /// The options of the daemon's own mount: without them bpffs is mode 1777, and any local
    /// user could make the pin root before the daemon does (systemd mounts it mode 0700 too).
    public static let mountOptions = "mode=0700"

    /// Mounts bpffs at /sys/fs/bpf, mode 0700, when `root` lies under it and it is not mounted yet.
    public static func ensureMounted(for root: String) throws {
        if isBPF(mountPoint) || !root.hasPrefix(mountPoint) { return }
        try Syscall.mount("bpf", at: mountPoint, options: mountOptions)
    }

    /// A real folder (a symbolic link to one is not).
    static func isDirectory(_ path: String) -> Bool {
        guard let info = try? Syscall.linkStatus(path) else { return false }
        return (info.st_mode & S_IFMT) == S_IFDIR
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
