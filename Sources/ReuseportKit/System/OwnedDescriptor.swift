#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// A file descriptor with one owner, who closes it exactly once: on `close()` or when the
/// owner is released. Every descriptor the system layer opens is close-on-exec; handing one
/// to a child is explicit (a `ProcessSpawn.FileAction.duplicate`, which dup2()s it in the
/// child without the flag).
public final class OwnedDescriptor: @unchecked Sendable, CustomStringConvertible {
    private var rawFD: Int32

    /// Takes ownership of `fd`: nobody else may close it.
    public init(adopting fd: FileDescriptor) {
        rawFD = fd.rawValue
    }

    /// The open descriptor. Using it after `close()` is a programming error. The owner closes
    /// it when released, which may be right after its last use, before a call that is handed
    /// the number: pass it with `withFD`, or store the owner.
    public var fd: FileDescriptor {
        precondition(rawFD >= 0, "OwnedDescriptor used after close()")
        return FileDescriptor(rawValue: rawFD)
    }

    /// Calls `body` with the descriptor's number and keeps this owner, and so the descriptor,
    /// alive until `body` returns.
    public func withFD<R>(_ body: (Int32) throws -> R) rethrows -> R {
        try withExtendedLifetime(self) { try body(fd.rawValue) }
    }

    /// Gives up ownership without closing: the caller now owns the returned number.
    public func release() -> Int32 {
        precondition(rawFD >= 0, "OwnedDescriptor released after close()")
        defer { rawFD = -1 }
        return rawFD
    }

    public var isClosed: Bool { rawFD < 0 }

    public var description: String { isClosed ? "fd (closed)" : "fd \(rawFD)" }

    /// Closes the descriptor (once; later calls do nothing).
    public func close() {
        guard rawFD >= 0 else { return }
        Syscall.close(rawFD)
        rawFD = -1
    }

    deinit { close() }

    /// A second, close-on-exec descriptor of the same open file, numbered `lowest` or above
    /// (fcntl(2) F_DUPFD_CLOEXEC).
    public func duplicate(atLeast lowest: Int32 = 0) throws -> OwnedDescriptor {
        try Syscall.duplicate(fd, atLeast: lowest)
    }

    /// Sets or clears O_NONBLOCK. It belongs to the open file description, so every
    /// duplicate (in this process or a child) sees the change.
    public func setNonBlocking(_ nonBlocking: Bool) throws {
        try Syscall.setNonBlocking(fd, nonBlocking)
    }
}
