#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import SystemPackage

/// The calls behind the daemon's notify socket (sd_notify(3) from workers): datagrams with
/// the sender's kernel-checked credentials.
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

    /// getpgid(2): the process group of `pid`; nil when there is no such process.
    public static func processGroup(of pid: pid_t) -> pid_t? {
        let group = getpgid(pid)
        return group < 0 ? nil : group
    }
}
