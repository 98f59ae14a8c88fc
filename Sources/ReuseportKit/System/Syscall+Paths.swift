#if canImport(Glibc)
import Glibc
#endif

/// The calls that examine and make the paths a root daemon relies on (TrustedPath.swift):
/// none of them follows a symbolic link in the last component.
extension Syscall {
    /// lstat(2): the entry itself, a symbolic link not followed. Throws with the errno (ENOENT
    /// for a missing entry, EACCES for a folder above it that this user may not search).
    public static func linkStatus(_ path: String) throws -> stat {
        var info = stat()
        try retrying("lstat(\(path))") { lstat(path, &info) }
        return info
    }

    /// readlink(2): where a symbolic link points, as written in it (maybe relative).
    public static func linkTarget(_ path: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = try retrying("readlink(\(path))") { readlink(path, &buffer, buffer.count - 1) }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// unlink(2) of the entry itself (a symbolic link is removed, not what it points at);
    /// false if it is not there.
    @discardableResult
    public static func removeEntry(_ path: String) throws -> Bool {
        if unlink(path) == 0 { return true }
        if errno == ENOENT { return false }
        throw ReuseportError.system("unlink(\(path))", errno)
    }

    /// getcwd(3), for making a relative path absolute before its folders are checked.
    public static func currentDirectory() throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { throw ReuseportError.system("getcwd", errno) }
        return String(cString: buffer)
    }

    /// mount(2) of a filesystem with `options` (the data argument, e.g. "mode=0700").
    public static func mount(_ type: String, at target: String, options: String?) throws {
        try retrying("mount(\(type), \(target), \(options ?? ""))") { Glibc.mount(type, target, type, 0, options) }
    }
}
