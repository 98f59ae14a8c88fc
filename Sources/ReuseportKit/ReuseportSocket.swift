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
    ///   - endpoint: the address to bind. Port 0 picks a port no socket holds (`unusedPort`).
    ///   - receiveBuffer: SO_RCVBUF in bytes, if set (the kernel doubles it and caps it at
    ///     net.core.rmem_max; SO_RCVBUFFORCE is tried first, which root may use past the cap).
    ///   - v6Only: IPV6_V6ONLY for IPv6 sockets; false makes `[::]` take IPv4 too.
    ///   - backlog: listen() backlog for TCP.
    public init(endpoint: Endpoint, receiveBuffer: Int? = nil, v6Only: Bool = true, backlog: Int32 = 1024) throws {
        guard endpoint.address.port == 0 else {
            (self.endpoint, descriptor) = try Self.bind(endpoint, receiveBuffer: receiveBuffer, v6Only: v6Only,
                                                        backlog: backlog)
            return
        }
        // Port 0: a port no socket holds, taken by a probe (`unusedPort`), then bound with
        // SO_REUSEPORT. Another socket may take that port between the two binds: then another.
        var attempt = 0
        while true {
            let chosen = Endpoint(endpoint.transport,
                                  SocketAddress(endpoint.address.address, try Self.unusedPort(endpoint, v6Only: v6Only)))
            do {
                (self.endpoint, descriptor) = try Self.bind(chosen, receiveBuffer: receiveBuffer, v6Only: v6Only,
                                                            backlog: backlog)
                return
            } catch let error as ReuseportError where error.errno == EADDRINUSE && attempt < Self.portAttempts {
                attempt += 1
            }
        }
    }

    /// How many more ports a port-0 socket tries when the one it picked was taken meanwhile.
    static let portAttempts = 8

    /// A port of `endpoint`'s address that no socket holds now, from the kernel's autobind of a
    /// probe without SO_REUSEPORT (closed before returning).
    ///
    /// Why not bind port 0 with SO_REUSEPORT set: over UDP that autobind may be given a port that
    /// a reuseport group of the same user already holds, and join that group. When it searches
    /// for a port, udp_lib_lport_inuse() (net/ipv4/udp.c) does not count the sockets a new one
    /// could share a group with (PortZeroTests: 20 of 400 autobinds landed on one of 900 held
    /// ports). The service would then take over another service's traffic, or hand it its own,
    /// once its program is attached to that group. TCP's autobind does not share a port this way
    /// (inet_csk_find_open_port()); the same probe serves both.
    static func unusedPort(_ endpoint: Endpoint, v6Only: Bool) throws -> UInt16 {
        let family = endpoint.address.address.family
        let probe = try Syscall.socket(family, endpoint.transport.socketType, "probe \(endpoint.transport)")
        if family == AF_INET6 {
            try Syscall.setOption(probe.fd.rawValue, Int32(IPPROTO_IPV6), IPV6_V6ONLY, Int32(v6Only ? 1 : 0),
                                  "IPV6_V6ONLY")
        }
        try Syscall.bind(probe.fd, endpoint.address, "\(endpoint) (choosing a port)")
        guard let bound = try Syscall.localAddress(probe.fd, "\(endpoint)") else {
            throw ReuseportError.invalidArgument("the probe for a port of \(endpoint) is not bound")
        }
        return bound.port
    }

    /// Creates, configures and binds a socket to `endpoint` (TCP: listening); returns the
    /// endpoint bound and the descriptor.
    private static func bind(_ endpoint: Endpoint, receiveBuffer: Int?, v6Only: Bool, backlog: Int32) throws
        -> (Endpoint, OwnedDescriptor)
    {
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
        return (Endpoint(endpoint.transport, try Syscall.localAddress(descriptor.fd, "\(endpoint)")!), descriptor)
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
    ///
    /// A UDP socket whose group goes on serving should `leavePort()` first: its close can take
    /// datagrams that the program steered nowhere near it.
    public func close() { descriptor.close() }

    /// Takes a UDP socket out of its port's lookups for good, before its last close, so that its
    /// close cannot swallow datagrams meant for the other sockets of its group. Nothing is done
    /// for TCP. After this, nothing enters the socket; what it already holds can still be read,
    /// but it can no longer send (its worker must be done with it).
    ///
    /// Why: the last close of a UDP socket runs udp_lib_unhash() (net/ipv4/udp.c), which takes it
    /// out of the reuseport group (reuseport_detach_sock() clears sk_reuseport_cb) before it
    /// takes it out of the port's hash chain. A lookup in between (udp4_lib_lookup2(), on another
    /// CPU) that meets it first in the chain finds no group, so it takes the closing socket
    /// itself, whatever the program would have chosen; the datagram is queued to a socket about
    /// to be freed and is lost uncounted. IPv4 reuseport sockets are added at the head of the
    /// chain, so the newest socket (a slot just removed by a scale-down) is met first. Measured
    /// here: 2–3 % of a flood to a group lost while another socket of the group is bound and
    /// closed in a loop; `kernel-check --break leave-port` shows it on any kernel.
    ///
    /// How: binding the socket to an interface index that no device has (SO_BINDTOIFINDEX, 5.0)
    /// makes compute_score() reject it for every packet from the moment the index is written,
    /// and the rehash that follows (udp_lib_rehash()) takes it out of the group while it stays in
    /// the chain, skipped. Its close then touches no lookup. What a lookup that raced with the
    /// setsockopt itself put into it stays in its queue: read it off (and count it) before the
    /// close.
    public func leavePort() throws {
        guard endpoint.transport == .udp else { return }
        try Self.leavePort(fd, "\(endpoint)")
    }

    /// `leavePort()` for a UDP socket that is not a ReuseportSocket (a probe that joined a group
    /// to learn who holds a port); `label` names it in the error.
    public static func leavePort(_ fd: FileDescriptor, _ label: String) throws {
        try Syscall.setOption(fd.rawValue, SOL_SOCKET, SO_BINDTOIFINDEX, noInterface,
                              "SO_BINDTOIFINDEX \(noInterface) (\(label) leaving its port)")
    }

    /// An interface index no device has: the kernel gives them out from 1 upwards, one per device
    /// created, and SO_BINDTOIFINDEX takes any index without checking that it exists.
    static let noInterface = Int32.max

    /// Reads off and discards every datagram queued at a UDP socket (bounded); returns how many.
    public func discardQueued() -> Int {
        guard endpoint.transport == .udp else { return 0 }
        var count = 0
        while count < 1_000_000, (try? Syscall.discardDatagram(fd)) == true { count += 1 }
        return count
    }

    /// For a UDP socket that leaves a port that goes on serving, once no process sends from it any
    /// more: `leavePortAndClose([self])`.
    public func leavePortAndClose() -> (discarded: Int, error: Error?) {
        let (discarded, failures) = Self.leavePortAndClose([self])
        return (discarded, failures.first?.error)
    }

    /// For UDP sockets that leave a port that goes on serving, once no process sends from them any
    /// more: each leaves the port (`leavePort()`), then the caller waits for the lookups already
    /// under way (one RCU grace period for all: `Syscall.waitForInFlightLookups`), reads off what
    /// they still hold, and closes them. A lookup that read the socket's interface binding just
    /// before `leavePort()` changed it may still deliver one datagram to it (the setsockopt
    /// changes the binding, then the group, and a lookup reads them in that order): measured, 2 of
    /// 20,000 with 6,301 sockets leaving. Such a datagram has arrived by the end of the grace
    /// period, so it is read off and counted, never freed unseen by the close. TCP sockets are only
    /// closed. Returns how many datagrams were read off (lost: counted by the caller), and the
    /// sockets whose `leavePort()` failed (closed all the same).
    public static func leavePortAndClose(_ sockets: [ReuseportSocket]) -> (discarded: Int, failures: [(socket: Endpoint, error: Error)]) {
        var failures: [(socket: Endpoint, error: Error)] = []
        var left = 0
        for socket in sockets where socket.endpoint.transport == .udp {
            do {
                try socket.leavePort()
                left += 1
            } catch {
                failures.append((socket.endpoint, error))
            }
        }
        if left > 0 { Syscall.waitForInFlightLookups() }
        var discarded = 0
        for socket in sockets {
            discarded += socket.discardQueued()
            socket.close()
        }
        return (discarded, failures)
    }

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
