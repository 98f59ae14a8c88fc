#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Real-socket helpers for tests, the kernel-feature suite and benchmarks: clients from
/// distinct source ports, and receiving on a service's sockets with a deadline. Failed calls
/// throw `ReuseportError.system`.
public enum TrafficError: Error, CustomStringConvertible {
    case timeout(String)

    public var description: String {
        switch self {
        case .timeout(let what): "timed out: \(what)"
        }
    }
}

/// A client socket (UDP or TCP) bound to its own source address and port.
public final class FlowClient {
    let descriptor: OwnedDescriptor
    public let transport: Transport
    public let local: SocketAddress

    /// The socket's number, for a test's own calls; this client owns it and closes it on release.
    public var fd: Int32 { descriptor.fd.rawValue }

    /// A socket bound to `local` (port 0: the kernel picks a free source port).
    public init(_ transport: Transport, local: SocketAddress) throws {
        self.transport = transport
        descriptor = try Syscall.socket(local.address.family, transport.socketType, "\(transport)")
        try Syscall.bind(descriptor.fd, local, "\(local)")
        self.local = try Syscall.localAddress(descriptor.fd, "\(local)")!
    }

    /// Sends one datagram to `destination`.
    public func send(_ payload: [UInt8], to destination: SocketAddress) throws {
        try payload.withUnsafeBytes { try Syscall.send(descriptor.fd, $0, to: destination) }
    }

    /// Connects (TCP) to `destination`.
    public func connect(to destination: SocketAddress) throws {
        try Syscall.connect(descriptor.fd, destination, "\(destination)")
    }

    /// Receives one datagram or stream chunk, waiting at most `timeoutMs`.
    public func receive(timeoutMs: Int32) throws -> [UInt8]? {
        if try Syscall.poll([descriptor.fd], timeoutMs: timeoutMs).isEmpty { return nil }
        var buffer = [UInt8](repeating: 0, count: 65536)
        guard let count = try Syscall.receive(descriptor.fd, into: &buffer) else { return nil }
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
        let fds = order.map { sockets[$0]!.fd }
        var deliveries: [Delivery] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while deliveries.count < expected {
            let ready = try Syscall.poll(fds, timeoutMs: idleMs)
            if ready.isEmpty { break }
            for (index, slot) in order.enumerated() where ready.contains(fds[index]) {
                while let (count, source) = try Syscall.receiveFrom(fds[index], into: &buffer, flags: Int32(MSG_DONTWAIT)) {
                    deliveries.append(Delivery(slot: slot, source: source!, payload: Array(buffer[0..<count])))
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
        let fds = order.map { sockets[$0]!.fd }
        let ready = try Syscall.poll(fds, timeoutMs: timeoutMs)
        guard let index = fds.firstIndex(where: ready.contains),
              let (accepted, peer) = try Syscall.accept(fds[index])
        else { return nil }
        accepted.close()
        return (order[index], peer!)
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

/// A port free on 127.0.0.1, 127.0.0.2 and [::1] for both UDP and TCP, from 20000–29999: below
/// the ephemeral range (32768 on), so that no other test's port-0 socket takes it before the
/// daemon (or the server a test starts) binds it. A port the kernel gave out for port 0 and took
/// back is free only until the next such socket, and the tests run side by side.
public func freePort() throws -> UInt16 {
    for _ in 0..<200 {
        let port = UInt16.random(in: 20000...29999)
        let free = (try? [
            FlowClient(.udp, local: SocketAddress(.loopbackV4, port)), FlowClient(.tcp, local: SocketAddress(.loopbackV4, port)),
            FlowClient(.udp, local: SocketAddress(.loopbackV6, port)), FlowClient(.tcp, local: SocketAddress(.loopbackV6, port)),
            FlowClient(.udp, local: SocketAddress(IPAddress("127.0.0.2")!, port)),
        ]) != nil
        if free { return port }
    }
    throw HarnessError("no free port in 20000-29999 after 200 tries")
}

/// Whether this process may load BPF programs (root). Tests that need it say why they skip.
public var isRoot: Bool { geteuid() == 0 }

/// Starts a process (argv[0] a path) with stdin from /dev/null and stdout and stderr
/// appended to `output`; returns its pid. The caller reaps it. `environment`: "NAME=value"
/// entries (nil: this process's environment).
public func spawn(_ arguments: [String], output: String, environment: [String]? = nil,
                  passing descriptors: [Int32] = []) throws -> pid_t {
    // Copies above the targets first: a descriptor numbered 3 or 4 would otherwise be overwritten
    // by the dup2 of another before its own.
    let copies = descriptors.map { fcntl($0, F_DUPFD_CLOEXEC, 1000) }
    defer { for copy in copies where copy >= 0 { close(copy) } }
    if let failed = copies.firstIndex(of: -1) {
        throw HarnessError("fcntl(\(descriptors[failed]), F_DUPFD_CLOEXEC): \(String(cString: strerror(errno)))")
    }
    let passed = copies.enumerated().map { ProcessSpawn.FileAction.duplicate($1, to: 3 + Int32($0)) }
    let spawn = ProcessSpawn(path: arguments[0], arguments: arguments, environment: environment,
                             fileActions: [.nullInput, .open(1, path: output, flags: O_WRONLY | O_CREAT | O_APPEND, mode: 0o644),
                                           .duplicate(1, to: 2)] + passed
                                           // Nothing else: the tests run side by side in this process,
                                           // and Foundation opens files without O_CLOEXEC.
                                           + [.closeFrom(3 + Int32(descriptors.count))])
    // A program written a moment ago (a test's copy of the daemon binary) can still be open for
    // writing in a child that another test's thread forked while the copy's descriptor was open,
    // until that child reaches its exec (which closes it: every child started here closes what it
    // inherited beyond its own descriptors): exec then fails with ETXTBSY (execve(2)). Seen once
    // in a full parallel run (AdoptionTests, "Text file busy"); retried briefly, as Go's os/exec does.
    var attempt = 0
    while true {
        do {
            return try spawn.start()
        } catch let error as ReuseportError where error.errno == ETXTBSY && attempt < 100 {
            attempt += 1
            usleep(10_000)
        }
    }
}
