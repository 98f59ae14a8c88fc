#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI

/// Thin wrappers over the syscalls the kit makes, in one place: EINTR is retried here,
/// and every failure becomes a `ReuseportError` naming the call.
enum Syscall {
    /// Runs `body` until it does not fail with EINTR; returns its result or throws.
    @discardableResult
    static func retrying<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = errno
            if code == EINTR { continue }
            throw ReuseportError.system(call(), code)
        }
    }

    static func setOption<T: BitwiseCopyable>(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: T, _ label: String) throws {
        var value = value
        try retrying("setsockopt(\(label))") {
            setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<T>.size))
        }
    }

    static func getOption<T: BitwiseCopyable>(_ fd: Int32, _ level: Int32, _ name: Int32, _ type: T.Type, _ label: String) throws -> T {
        let storage = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { storage.deallocate() }
        var length = socklen_t(MemoryLayout<T>.size)
        try retrying("getsockopt(\(label))") { getsockopt(fd, level, name, storage, &length) }
        return storage.pointee
    }

    /// Closes `fd`; EINTR is not retried (Linux has released the fd already, see close(2)).
    static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }
}
