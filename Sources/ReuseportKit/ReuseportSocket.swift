#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import SystemPackage

/// A socket bound with SO_REUSEPORT: one slot of a listener's reuseport group.
///
/// It is created close-on-exec; handing it to a worker is explicit (the daemon dups it
/// onto fd 3 in the child). It owns its fd and closes it exactly once, on `close()` or
/// when it is released.
public final class ReuseportSocket: @unchecked Sendable {
    /// The endpoint actually bound: with port 0 asked, the port the kernel chose.
    public let endpoint: Endpoint
    private let descriptor: OwnedDescriptor

    /// The open descriptor. Using it after `close()` is a programming error.
    public var fd: FileDescriptor { descriptor.fd }


    /// Creates, configures and binds the socket; TCP sockets also listen, because the
    /// kernel forms a TCP reuseport group only at listen() and only then will the socket
    /// array take it (net/core/sock_reuseport.c, reuseport_array_update_check()).
    ///
    /// - Parameters:
    ///   - endpoint: the address to bind. Port 0 picks a free port.
    ///   - receiveBuffer: SO_RCVBUF in bytes, if set (the kernel doubles it and caps it at
    ///     net.core.rmem_max; SO_RCVBUFFORCE is tried first, which root may use past the cap).
    ///   - v6Only: IPV6_V6ONLY for IPv6 sockets; false makes `[::]` take IPv4 too.
    ///   - backlog: listen() backlog for TCP.
    public init(endpoint: Endpoint, receiveBuffer: Int? = nil, v6Only: Bool = true, backlog: Int32 = 1024) throws {
        let family = endpoint.address.address.family
        // Closed by its deinit if anything below throws.
        let descriptor = try Syscall.socket(family, endpoint.transport.socketType, "\(endpoint.transport)")
        let fd = descriptor.fd.rawValue
        try Syscall.setOption(fd, SOL_SOCKET, SO_REUSEPORT, Int32(1), "SO_REUSEPORT")
        if endpoint.transport == .tcp {
            try Syscall.setOption(fd, SOL_SOCKET, SO_REUSEADDR, Int32(1), "SO_REUSEADDR")
        }
        if family == AF_INET6 {
            try Syscall.setOption(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, Int32(v6Only ? 1 : 0), "IPV6_V6ONLY")
        }
        if let receiveBuffer {
            let size = Int32(clamping: receiveBuffer)
            do {
                try Syscall.setOption(fd, SOL_SOCKET, SO_RCVBUFFORCE, size, "SO_RCVBUFFORCE")
            } catch {
                try Syscall.setOption(fd, SOL_SOCKET, SO_RCVBUF, size, "SO_RCVBUF")
            }
        }
        try Syscall.bind(descriptor.fd, endpoint.address, "\(endpoint)")
        if endpoint.transport == .tcp {
            try Syscall.listen(descriptor.fd, backlog: backlog, "\(endpoint)")
        }
        self.endpoint = Endpoint(endpoint.transport, try Syscall.localAddress(descriptor.fd, "\(endpoint)")!)
        self.descriptor = descriptor
    }

    /// Takes over a socket made by an earlier run of the daemon (copied out of its worker,
    /// handed over across an exec, or kept in systemd's descriptor store), after checking that it
    /// is one this daemon would have made for `expected`: the same transport, SO_REUSEPORT set,
    /// bound to the same address, to the same port (any port when `expected` asks for port 0),
    /// and, for TCP, listening. Throws `invalidArgument` naming what differs; the descriptor is
    /// then closed.
    public init(adopting descriptor: OwnedDescriptor, expected: Endpoint) throws {
        let fd = descriptor.fd.rawValue
        let type = try Syscall.getOption(fd, SOL_SOCKET, SO_TYPE, Int32.self, "SO_TYPE")
        guard type == expected.transport.socketType else {
            throw ReuseportError.invalidArgument("socket type \(type), not the \(expected.transport) of \(expected)")
        }
        guard try Syscall.getOption(fd, SOL_SOCKET, SO_REUSEPORT, Int32.self, "SO_REUSEPORT") != 0 else {
            throw ReuseportError.invalidArgument("SO_REUSEPORT is not set, so it is in no reuseport group of \(expected)")
        }
        guard let bound = try Syscall.localAddress(descriptor.fd, "\(expected)") else {
            throw ReuseportError.invalidArgument("not bound (\(expected) was expected)")
        }
        guard bound.address == expected.address.address,
              expected.address.port == 0 || bound.port == expected.address.port
        else {
            throw ReuseportError.invalidArgument("bound to \(bound), not to \(expected.address)")
        }
        if expected.transport == .tcp {
            guard try Syscall.getOption(fd, SOL_SOCKET, SO_ACCEPTCONN, Int32.self, "SO_ACCEPTCONN") != 0 else {
                throw ReuseportError.invalidArgument("a TCP socket of \(expected) that does not listen")
            }
        }
        self.endpoint = Endpoint(expected.transport, bound)
        self.descriptor = descriptor
    }

    deinit { close() }

    /// Closes the socket (once; later calls do nothing). A socket closed while in a
    /// REUSEPORT_SOCKARRAY leaves the array: lookups of its slot give ENOENT.
    public func close() { descriptor.close() }

    /// The socket cookie (SO_COOKIE): what a REUSEPORT_SOCKARRAY lookup returns.
    public func cookie() throws -> UInt64 {
        try Syscall.getOption(fd.rawValue, SOL_SOCKET, SO_COOKIE, UInt64.self, "SO_COOKIE")
    }

    /// Attaches an SK_REUSEPORT program to this socket's group (SO_ATTACH_REUSEPORT_EBPF).
    /// Attaching through one member applies to the whole group and replaces any program
    /// attached before.
    public func attach(_ program: some ReuseportProgram) throws {
        try Syscall.setOption(fd.rawValue, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, program.programFD,
                              "SO_ATTACH_REUSEPORT_EBPF, \(endpoint)")
    }

    /// Detaches the program of this socket's group, if it has one (SO_DETACH_REUSEPORT_BPF, 5.3):
    /// until a program is attached again, the kernel picks a member of the group by its own hash.
    /// Returns false when the group had none (ENOENT).
    @discardableResult
    public func detachProgram() throws -> Bool {
        do {
            try Syscall.setOption(fd.rawValue, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, Int32(0),
                                  "SO_DETACH_REUSEPORT_BPF, \(endpoint)")
            return true
        } catch let error as ReuseportError where error.errno == ENOENT {
            return false
        }
    }
}
