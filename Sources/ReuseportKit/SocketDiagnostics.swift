#if canImport(Glibc)
import Glibc
#endif
import CSockDiag
import ReuseportKit

/// What the kernel reports about one socket through sock_diag.
public struct SocketDiagnosis: Sendable {
    public var transport: Transport
    public var local: SocketAddress
    public var cookie: UInt64
    public var inode: UInt64
    /// Bytes waiting in the receive queue (UDP) or the accept queue length (TCP listener).
    public var receiveQueue: UInt64
    /// sk_drops: datagrams the kernel dropped at this socket (receive buffer full, filter,
    /// checksum); nil when the kernel did not report it.
    public var drops: UInt64?
    /// IPV6_V6ONLY of an IPv6 socket (nil for IPv4, or when the kernel did not say).
    public var v6Only: Bool? = nil
    /// SK_MEMINFO_RMEM_ALLOC and SK_MEMINFO_RCVBUF: the memory the receive queue holds (the
    /// datagrams' truesize, not their payload) and its limit. UDP drops a datagram that would
    /// take the first above the second (__udp_enqueue_schedule_skb() in net/ipv4/udp.c).
    public var receiveMemory: UInt64? = nil
    public var receiveBuffer: UInt64? = nil
}

/// sock_diag (NETLINK_SOCK_DIAG, inet_diag): every UDP socket and TCP listener of this network
/// namespace with its cookie, inode and SK_MEMINFO_DROPS. A REUSEPORT_SOCKARRAY lookup gives
/// a socket's cookie, and inet_diag reports the same cookie (net/core/sock_diag.c,
/// sock_diag_save_cookie()), so a slot's socket is matched exactly, unlike /proc/net/udp
/// which has no cookie. INET_DIAG_SKMEMINFO came with 3.6; udp_diag is a module the kernel
/// loads on the first request.
/// Shared by reuseportctl (drops per socket) and the daemon (SlotStallMonitor: a slot whose
/// worker stopped reading).
public enum SocketDiagnostics {
    /// The sockets of `transports`, both families, by cookie.
    public static func sockets(_ transports: Set<Transport>) throws -> [UInt64: SocketDiagnosis] {
        let socket = try openSocket()
        defer { socket.close() }
        return try sockets(transports, using: socket)
    }

    /// A NETLINK_SOCK_DIAG socket, for a caller that asks again and again (the daemon, every
    /// second) and must not need a new descriptor each time (it may have none to spare).
    public static func openSocket() throws -> OwnedDescriptor {
        try Syscall.socket(AF_NETLINK, Int32(SOCK_DGRAM.rawValue), protocol: NETLINK_SOCK_DIAG,
                           "AF_NETLINK, NETLINK_SOCK_DIAG")
    }

    /// As `sockets(_:)`, over a socket from `openSocket()`.
    public static func sockets(_ transports: Set<Transport>, using socket: OwnedDescriptor) throws
        -> [UInt64: SocketDiagnosis]
    {
        var found: [UInt64: SocketDiagnosis] = [:]
        var sequence: UInt32 = 1
        for transport in Transport.allCases where transports.contains(transport) {
            for family in [AF_INET, AF_INET6] {
                try dump(socket, transport: transport, family: family, sequence: sequence) { found[$0.cookie] = $0 }
                sequence += 1
            }
        }
        return found
    }

    private static func dump(_ socket: OwnedDescriptor, transport: Transport, family: Int32, sequence: UInt32,
                             _ each: (SocketDiagnosis) -> Void) throws {
        let call = "sock_diag dump(\(transport), \(family == AF_INET ? "IPv4" : "IPv6"))"
        var request = rp_diag_request()
        request.header.nlmsg_len = UInt32(MemoryLayout<rp_diag_request>.size)
        request.header.nlmsg_type = UInt16(SOCK_DIAG_BY_FAMILY)
        request.header.nlmsg_flags = UInt16(NLM_F_REQUEST | NLM_F_DUMP)
        request.header.nlmsg_seq = sequence
        request.body.sdiag_family = UInt8(family)
        request.body.sdiag_protocol = transport.ipProtocol
        request.body.idiag_ext = UInt8(1 << (INET_DIAG_SKMEMINFO - 1))
        // UDP sockets are in TCP_CLOSE (unconnected) or TCP_ESTABLISHED; for TCP only listeners matter.
        request.body.idiag_states = transport == .udp ? UInt32.max : UInt32(1 << 10)  // TCP_LISTEN
        var kernel = sockaddr_nl()
        kernel.nl_family = sa_family_t(AF_NETLINK)
        try withUnsafePointer(to: &kernel) { address in
            try address.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                try withUnsafeBytes(of: &request) { bytes in
                    try Syscall.send(socket.fd, bytes, to: address, length: socklen_t(MemoryLayout<sockaddr_nl>.size), call)
                }
            }
        }

        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            // A blocking socket: nil (EAGAIN) cannot come.
            let count = try Syscall.receive(socket.fd, into: &buffer, call) ?? 0
            let done = try buffer.withUnsafeBytes { bytes in
                try parse(UnsafeRawBufferPointer(rebasing: bytes[0..<count]), transport: transport, call: call, each)
            }
            if done || count == 0 { return }
        }
    }

    /// Parses one read of netlink messages; true at NLMSG_DONE.
    private static func parse(_ bytes: UnsafeRawBufferPointer, transport: Transport, call: String,
                              _ each: (SocketDiagnosis) -> Void) throws -> Bool {
        let headerSize = MemoryLayout<nlmsghdr>.size
        var offset = 0
        while offset + headerSize <= bytes.count {
            let header = bytes.loadUnaligned(fromByteOffset: offset, as: nlmsghdr.self)
            let length = Int(header.nlmsg_len)
            guard length >= headerSize, offset + length <= bytes.count else { return true }
            let body = offset + Int(rp_nlmsg_align(UInt32(headerSize)))
            switch Int32(header.nlmsg_type) {
            case NLMSG_DONE:
                return true
            case NLMSG_ERROR:
                let code = bytes.loadUnaligned(fromByteOffset: body, as: Int32.self)
                if code == 0 { return true }
                let hint = -code == ENOENT ? "the kernel has no sock_diag for \(transport) (module \(transport)_diag)" : nil
                throw ReuseportError.system(call: call, errno: -code, hint: hint)
            case Int32(SOCK_DIAG_BY_FAMILY):
                if let socket = diagnosis(bytes, from: body, to: offset + length, transport: transport) { each(socket) }
            default:
                break
            }
            offset += Int(rp_nlmsg_align(UInt32(length)))
        }
        return false
    }

    private static func diagnosis(_ bytes: UnsafeRawBufferPointer, from start: Int, to end: Int,
                                  transport: Transport) -> SocketDiagnosis? {
        let messageSize = MemoryLayout<inet_diag_msg>.size
        guard start + messageSize <= end else { return nil }
        let message = bytes.loadUnaligned(fromByteOffset: start, as: inet_diag_msg.self)
        let addressBytes = withUnsafeBytes(of: message.id.idiag_src) { Array($0) }
        let address: IPAddress?
        switch Int32(message.idiag_family) {
        case AF_INET: address = IPAddress(bytes: Array(addressBytes[0..<4]))
        case AF_INET6: address = IPAddress(bytes: addressBytes)
        default: address = nil
        }
        guard let address else { return nil }
        let cookie = UInt64(message.id.idiag_cookie.0) | UInt64(message.id.idiag_cookie.1) << 32
        var drops: UInt64?
        var v6Only: Bool?
        var receiveMemory: UInt64?
        var receiveBuffer: UInt64?
        var offset = start + Int(rp_nlmsg_align(UInt32(messageSize)))
        let attributeHeader = MemoryLayout<nlattr>.size
        while offset + attributeHeader <= end {
            let attribute = bytes.loadUnaligned(fromByteOffset: offset, as: nlattr.self)
            let length = Int(attribute.nla_len)
            guard length >= attributeHeader, offset + length <= end else { break }
            if Int(attribute.nla_type) == INET_DIAG_SKMEMINFO {
                let fields = (length - attributeHeader) / MemoryLayout<UInt32>.size
                func field(_ index: Int) -> UInt64? {
                    guard index < fields else { return nil }
                    let at = offset + attributeHeader + index * MemoryLayout<UInt32>.size
                    return UInt64(bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self))
                }
                drops = field(Int(SK_MEMINFO_DROPS))
                receiveMemory = field(Int(SK_MEMINFO_RMEM_ALLOC))
                receiveBuffer = field(Int(SK_MEMINFO_RCVBUF))
            }
            if Int(attribute.nla_type) == INET_DIAG_SKV6ONLY, length > attributeHeader {
                v6Only = bytes.load(fromByteOffset: offset + attributeHeader, as: UInt8.self) != 0
            }
            offset += Int(rp_nla_align(UInt32(length)))
        }
        return SocketDiagnosis(transport: transport, local: SocketAddress(address, UInt16(bigEndian: message.id.idiag_sport)),
                               cookie: cookie, inode: UInt64(message.idiag_inode),
                               receiveQueue: UInt64(message.idiag_rqueue), drops: drops, v6Only: v6Only,
                               receiveMemory: receiveMemory, receiveBuffer: receiveBuffer)
    }
}

extension ReuseportSocket {
    /// The datagrams the kernel dropped at this socket (its receive buffer full, say), from
    /// getsockopt(SO_MEMINFO): no sock_diag module needed (a kernel may build udp_diag as a
    /// module that is not loaded). 0 if the kernel will not say.
    public func receiveDrops() -> UInt64 {
        var info = [UInt32](repeating: 0, count: Int(SK_MEMINFO_VARS))
        var length = socklen_t(info.count * MemoryLayout<UInt32>.size)
        let result = info.withUnsafeMutableBytes { getsockopt(fd.rawValue, SOL_SOCKET, SO_MEMINFO, $0.baseAddress, &length) }
        return result == 0 ? UInt64(info[Int(SK_MEMINFO_DROPS)]) : 0
    }
}
