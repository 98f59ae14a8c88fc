#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess

/// The calls that keep track of every process a worker starts (ReuseportDaemon's WorkerProcesses).
extension Syscall {
    /// prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants become this process's children.
    public static func becomeChildSubreaper() throws {
        try retrying("prctl(PR_SET_CHILD_SUBREAPER)") { rpd_set_child_subreaper(1) }
    }

    /// mkdir(2) of one folder; false if it exists already.
    @discardableResult
    public static func makeDirectory(_ path: String, mode: mode_t = 0o755) throws -> Bool {
        if mkdir(path, mode) == 0 { return true }
        if errno == EEXIST { return false }
        throw ReuseportError.system("mkdir(\(path))", errno)
    }

    /// rmdir(2); false if the folder is not there.
    @discardableResult
    public static func removeDirectory(_ path: String) throws -> Bool {
        if rmdir(path) == 0 { return true }
        if errno == ENOENT { return false }
        throw ReuseportError.system("rmdir(\(path))", errno)
    }

    /// The names in a folder (opendir(3)/readdir(3)), without "." and ".."; empty if it cannot be read.
    public static func directoryEntries(_ path: String) -> [String] {
        guard let directory = opendir(path) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
