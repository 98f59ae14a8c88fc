#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// Non-blocking sends and waits for room, for servers that must not stall on one peer (the
/// built-in workers).
extension Syscall {
    /// sendto(2) of one datagram with MSG_DONTWAIT: the bytes sent, or nil when the socket's send
    /// buffer is full (EAGAIN, or ENOBUFS from a full device queue: try again once there is room).
    public static func sendNow(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, to address: SocketAddress)
        throws -> Int?
    {
        do {
            return try address.withSockaddr { pointer, length in
                try retryingUnlessWouldBlock("sendto(\(address))") {
                    Glibc.sendto(fd.rawValue, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), pointer, length)
                }
            }
        } catch let error as ReuseportError where error.errno == ENOBUFS {
            return nil
        }
    }

    /// write(2) on a non-blocking descriptor (MSG_NOSIGNAL for a socket: a closed peer is an
    /// EPIPE error, not a SIGPIPE): the bytes written, or nil when there is no room.
    public static func writeNow(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer) throws -> Int? {
        try retryingUnlessWouldBlock("send(fd \(fd.rawValue))") {
            Glibc.send(fd.rawValue, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
        }
    }

    /// poll(2) for POLLOUT: true once `fd` can take more, false at the timeout.
    public static func waitWritable(_ fd: FileDescriptor, timeoutMs: Int32) throws -> Bool {
        var entry = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
        return try retrying("poll(fd \(fd.rawValue), POLLOUT)") { Glibc.poll(&entry, 1, timeoutMs) } > 0
    }
}
