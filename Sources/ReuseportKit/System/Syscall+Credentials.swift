#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import SystemPackage

/// The calls behind the notify sockets (sd_notify(3)): datagrams with the sender's
/// kernel-checked credentials (the daemon's, from workers), and datagrams with descriptors
/// passed along (the daemon's to systemd's fd store).
extension Syscall {
    /// One datagram waiting at a Unix datagram socket, as recvmsg(2) gives it with SO_PASSCRED.
    public struct CredentialedDatagram: Sendable {
        /// The datagram's length; more than the buffer when it was cut.
        public var length: Int
        /// The sender's pid as the kernel saw it (SCM_CREDENTIALS); nil when none came.
        public var pid: pid_t?
        public var uid: uid_t
    }

    /// recvmsg(2) of one datagram into `buffer` with its SCM_CREDENTIALS (MSG_TRUNC: the full
    /// length comes back even when it was cut; descriptors sent along are closed at once);
    /// nil when none waits.
    public static func receiveWithCredentials(_ fd: FileDescriptor, into buffer: inout [UInt8]) throws
        -> CredentialedDatagram?
    {
        var pid: pid_t = 0
        var uid: uid_t = 0
        let capacity = buffer.count
        let length = try buffer.withUnsafeMutableBytes { bytes in
            try retryingUnlessWouldBlock("recvmsg(fd \(fd.rawValue), SCM_CREDENTIALS)") {
                rpd_receive_with_credentials(fd.rawValue, bytes.baseAddress, UInt(capacity), &pid, &uid)
            }
        }
        guard let length else { return nil }
        return CredentialedDatagram(length: Int(length), pid: pid == 0 ? nil : pid, uid: uid)
    }

    /// sendmsg(2) of `bytes` with `descriptors` passed along (SCM_RIGHTS, at most 253): the
    /// receiver gets its own copies, these stay open. How the daemon hands a socket to
    /// systemd's fd store (sd_pid_notify_with_fds(3)).
    public static func send(_ fd: FileDescriptor, _ bytes: [UInt8], passing descriptors: [FileDescriptor]) throws {
        let numbers = descriptors.map(\.rawValue)
        _ = try bytes.withUnsafeBytes { buffer in
            try retrying("sendmsg(fd \(fd.rawValue), SCM_RIGHTS of \(numbers.count) fds)") {
                rpd_send_with_descriptors(fd.rawValue, buffer.baseAddress, UInt(buffer.count), numbers, numbers.count)
            }
        }
    }

    /// recvmsg(2) of one datagram into `buffer`, with the descriptors passed along (SCM_RIGHTS),
    /// each close-on-exec and owned by the caller now; nil when none waits.
    public static func receiveWithDescriptors(_ fd: FileDescriptor, into buffer: inout [UInt8]) throws
        -> (length: Int, descriptors: [OwnedDescriptor])?
    {
        var numbers = [Int32](repeating: -1, count: 253)
        var count = 0
        let capacity = buffer.count
        let length = try buffer.withUnsafeMutableBytes { bytes in
            try retryingUnlessWouldBlock("recvmsg(fd \(fd.rawValue), SCM_RIGHTS)") {
                rpd_receive_with_descriptors(fd.rawValue, bytes.baseAddress, UInt(capacity), &numbers, numbers.count,
                                             &count)
            }
        }
        let descriptors = numbers.prefix(count).map { OwnedDescriptor(adopting: FileDescriptor(rawValue: $0)) }
        guard let length else { return nil }
        return (Int(length), descriptors)
    }

    /// getpgid(2): the process group of `pid`; nil when there is no such process.
    public static func processGroup(of pid: pid_t) -> pid_t? {
        let group = getpgid(pid)
        return group < 0 ? nil : group
    }
}
