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
    /// it when released, which may be right after its last use: keep the owner alive while the
    /// number is in use (`withExtendedLifetime`), or store the owner.
    public var fd: FileDescriptor {
        precondition(rawFD >= 0, "OwnedDescriptor used after close()")
        return FileDescriptor(rawValue: rawFD)
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
