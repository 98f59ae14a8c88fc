#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Real-socket helpers for tests, the kernel-feature suite and benchmarks: clients from
/// distinct source ports, and receiving on a service's sockets with a deadline.
public enum TrafficError: Error, CustomStringConvertible {
    case system(String, Int32)
    case timeout(String)

    public var description: String {
        switch self {
        case .system(let call, let code): "\(call): \(String(decoding: strerrorBytes(code), as: UTF8.self))"
        case .timeout(let what): "timed out: \(what)"
        }
    }
}

func strerrorBytes(_ code: Int32) -> [UInt8] {
    guard let text = strerror(code) else { return [] }
    return Array(UnsafeBufferPointer(start: text, count: strlen(text))).map { UInt8(bitPattern: $0) }
}

func check(_ result: Int32, _ call: String) throws {
    if result < 0 { throw TrafficError.system(call, errno) }
}

/// A client socket (UDP or TCP) bound to its own source address and port.
public final class FlowClient {
    public let fd: Int32
    public let transport: Transport
    public private(set) var local: SocketAddress

    /// A socket bound to `local` (port 0: the kernel picks a free source port).
    public init(_ transport: Transport, local: SocketAddress) throws {
        self.transport = transport
        let type = transport == .udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue)
        fd = socket(local.address.family, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        try check(fd, "socket")
        self.local = local
        do {
            try local.withSockaddr { try check(bind(fd, $0, $1), "bind(\(local))") }
            self.local = try FlowClient.localAddress(fd)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    static func localAddress(_ fd: Int32) throws -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try withUnsafeMutablePointer(to: &storage) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try check(getsockname(fd, $0, &length), "getsockname") }
        }
        return SocketAddress(storage: storage)!
    }

    /// Sends one datagram to `destination`.
    public func send(_ payload: [UInt8], to destination: SocketAddress) throws {
        let sent = payload.withUnsafeBytes { bytes in
            destination.withSockaddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, $1) }
        }
        if sent < 0 { throw TrafficError.system("sendto(\(destination))", errno) }
    }

    /// Connects (TCP) to `destination`.
    public func connect(to destination: SocketAddress) throws {
        try destination.withSockaddr { try check(Glibc.connect(fd, $0, $1), "connect(\(destination))") }
    }

    /// Receives one datagram or stream chunk, waiting at most `timeoutMs`.
    public func receive(timeoutMs: Int32) throws -> [UInt8]? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&pfd, 1, timeoutMs)
        if ready < 0 { throw TrafficError.system("poll", errno) }
        if ready == 0 { return nil }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if count < 0 { throw TrafficError.system("recv", errno) }
        return Array(buffer[0..<count])
    }
}

/// One datagram received on a slot's socket.
public struct Delivery: Sendable {
    public var slot: UInt32
    public var source: SocketAddress
    public var payload: [UInt8]
}

public enum Traffic {
    /// Opens `count` clients on `address` with distinct kernel-chosen source ports.
    public static func clients(_ count: Int, _ transport: Transport = .udp, on address: IPAddress) throws -> [FlowClient] {
        try (0..<count).map { _ in try FlowClient(transport, local: SocketAddress(address, 0)) }
    }

    /// Reads datagrams from the given slot sockets until `expected` have arrived or
    /// nothing arrives for `idleMs`. Returns them in arrival order per socket.
    public static func receive(from sockets: [UInt32: ReuseportSocket], expected: Int,
                               idleMs: Int32 = 1000) throws -> [Delivery] {
        let order = sockets.keys.sorted()
        var fds = order.map { pollfd(fd: sockets[$0]!.fd.rawValue, events: Int16(POLLIN), revents: 0) }
        var deliveries: [Delivery] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while deliveries.count < expected {
            let ready = poll(&fds, nfds_t(fds.count), idleMs)
            if ready < 0 {
                if errno == EINTR { continue }
                throw TrafficError.system("poll", errno)
            }
            if ready == 0 { break }
            for (index, slot) in order.enumerated() where fds[index].revents & Int16(POLLIN) != 0 {
                while true {
                    var storage = sockaddr_storage()
                    var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                    let count = buffer.withUnsafeMutableBytes { bytes in
                        withUnsafeMutablePointer(to: &storage) {
                            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                                recvfrom(fds[index].fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, &length)
                            }
                        }
                    }
                    if count < 0 {
                        if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { break }
                        throw TrafficError.system("recvfrom", errno)
                    }
                    deliveries.append(Delivery(slot: slot, source: SocketAddress(storage: storage)!,
                                               payload: Array(buffer[0..<count])))
                }
            }
        }
        return deliveries
    }

    /// Accepts one pending connection on whichever slot socket has it, waiting at most
    /// `timeoutMs`. Returns the slot and the peer; the accepted socket is closed.
    public static func acceptOne(from sockets: [UInt32: ReuseportSocket], timeoutMs: Int32 = 2000) throws
        -> (slot: UInt32, peer: SocketAddress)?
    {
        let order = sockets.keys.sorted()
        var fds = order.map { pollfd(fd: sockets[$0]!.fd.rawValue, events: Int16(POLLIN), revents: 0) }
        let ready = poll(&fds, nfds_t(fds.count), timeoutMs)
        if ready < 0 { throw TrafficError.system("poll", errno) }
        guard ready > 0, let index = fds.firstIndex(where: { $0.revents & Int16(POLLIN) != 0 }) else { return nil }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let accepted = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { accept(fds[index].fd, $0, &length) }
        }
        try check(accepted, "accept")
        close(accepted)
        return (order[index], SocketAddress(storage: storage)!)
    }

    /// Sends one datagram from each client to `destination` and returns, per client source,
    /// the slot that received it. Throws if any datagram is not received.
    ///
    /// Sends in rounds of `batch` and reads after each: queuing hundreds of datagrams before
    /// reading any can overflow a default receive buffer (each small datagram is charged its
    /// skb's truesize, over 1 KiB), and a lost datagram would look like a misplaced flow.
    public static func slotsOf(clients: [FlowClient], sending destination: SocketAddress,
                               sockets: [UInt32: ReuseportSocket], batch: Int = 64) throws -> [SocketAddress: UInt32] {
        var slots: [SocketAddress: UInt32] = [:]
        var start = 0
        while start < clients.count {
            let round = clients[start..<min(start + batch, clients.count)]
            for (offset, client) in round.enumerated() {
                try client.send(Array("flow \(start + offset)".utf8), to: destination)
            }
            let deliveries = try receive(from: sockets, expected: round.count)
            guard deliveries.count == round.count else {
                throw TrafficError.timeout("\(deliveries.count) of \(round.count) datagrams of a round arrived")
            }
            for delivery in deliveries { slots[delivery.source] = delivery.slot }
            start += round.count
        }
        guard slots.count == clients.count else {
            throw TrafficError.timeout("\(slots.count) of \(clients.count) clients were seen")
        }
        return slots
    }
}

/// Whether this process may load BPF programs (root). Tests that need it say why they skip.
public var isRoot: Bool { geteuid() == 0 }

/// Starts a process (argv[0] a path) with stdin from /dev/null and stdout and stderr
/// appended to `output`; returns its pid. The caller reaps it.
public func spawn(_ arguments: [String], output: String) throws -> pid_t {
    try ProcessSpawn(path: arguments[0], arguments: arguments,
                     fileActions: [.nullInput, .open(1, path: output, flags: O_WRONLY | O_CREAT | O_APPEND, mode: 0o644),
                                   .duplicate(1, to: 2)]).start()
}
