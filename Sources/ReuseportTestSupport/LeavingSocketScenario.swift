#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit

/// A socket that leaves a reuseport group while the group serves must not take its traffic
/// with it (`ReuseportSocket.leavePort()`). Written once: run by LeavingSocketTests and by
/// kernel-check on every kernel of the VM matrix.
public enum LeavingSocketScenario {
    public struct Outcome: Sendable, CustomStringConvertible {
        /// Datagrams the client sent, all of them steered to slot 0 by the program.
        public var sent: Int
        /// Read at slot 0.
        public var received: Int
        /// Read off the leaving sockets between `leavePort()` and their close (counted, not lost).
        public var readOff: Int
        /// Dropped by the kernel at slot 0's socket (its receive buffer full).
        public var drops: UInt64
        /// Sockets that joined the group and left it while the datagrams flowed.
        public var leavings: Int
        /// Datagrams no socket has and no counter names.
        public var lost: Int { sent - received - readOff - Int(drops) }

        public var description: String {
            "\(sent) datagrams sent while \(leavings) sockets joined the group and left it: \(received) read at "
                + "slot 0, \(readOff) read off the leaving sockets, \(drops) dropped by the kernel, \(lost) lost"
        }
    }

    /// A UDP service of one slot on `address` takes `datagrams` datagrams from one client on one
    /// thread while, on this one, sockets join its group (bound with SO_REUSEPORT to its port:
    /// each is the newest, met first by lookups, as a slot added by a scale-up is) and leave it
    /// again, each by close alone or, with `leavingPort`, by `leavePortAndClose()`. None of them
    /// is in the program's array, so the program steers every datagram to slot 0.
    public static func run(address: IPAddress = .loopbackV4, datagrams: Int = 60_000, leavingPort: Bool) throws
        -> Outcome
    {
        // Room for every datagram at slot 0 (about 1 KiB of truesize each): it is read at the end.
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(address, 0))], slotCount: 1,
                                         options: .init(receiveBuffer: 128 << 20))
        defer { plane.close() }
        let slot0 = plane.listeners[0].sockets[0]!
        let destination = plane.listeners[0].endpoint
        let client = try Traffic.clients(1, on: address)[0]
        let sender = Sender(client: client, destination: destination.address, count: datagrams)
        let thread = Thread { sender.run() }
        thread.start()
        var leavings = 0
        var readOff = 0
        while !sender.finished {
            let joining = try ReuseportSocket(endpoint: destination)
            if leavingPort {
                let (discarded, error) = joining.leavePortAndClose()
                if let error { throw error }
                readOff += discarded
            } else {
                joining.close()
            }
            leavings += 1
        }
        if let failure = sender.failure { throw failure }
        // What the loopback still carries reaches slot 0 within moments.
        var received = 0
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        while received + readOff < datagrams, MonotonicClock.nanoseconds() < deadline {
            while (try? Syscall.discardDatagram(slot0.fd)) == true { received += 1 }
            if received + readOff < datagrams { usleep(10_000) }
        }
        let drops = try SocketDiagnostics.sockets([.udp])[slot0.cookie()]?.drops ?? 0
        return Outcome(sent: sender.sent, received: received, readOff: readOff, drops: drops, leavings: leavings)
    }

    /// The mechanism alone, deterministic even on one CPU: two sockets of a group without a
    /// program (the kernel's own hash spreads flows over both), the second leaves the port, and
    /// `flows` flows then all reach the first. Returns how many reached each.
    public static func leftSocketGetsNothing(address: IPAddress = .loopbackV4, flows: Int = 64) throws
        -> (stayed: Int, left: Int)
    {
        let staying = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(address, 0)))
        let leaving = try ReuseportSocket(endpoint: staying.endpoint)
        defer { staying.close(); leaving.close() }
        try leaving.leavePort()
        for client in try Traffic.clients(flows, on: address) { try client.send([0x2a], to: staying.endpoint.address) }
        var stayed = 0
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        while stayed < flows, MonotonicClock.nanoseconds() < deadline {
            while (try? Syscall.discardDatagram(staying.fd)) == true { stayed += 1 }
            if stayed < flows { usleep(10_000) }
        }
        return (stayed, leaving.discardQueued())
    }

    /// Sends `count` one-byte datagrams as fast as it can, from its own thread.
    final class Sender: @unchecked Sendable {
        let client: FlowClient
        let destination: SocketAddress
        let count: Int
        private let lock = NSLock()
        private var done = false
        private(set) var sent = 0
        private(set) var failure: Error?

        init(client: FlowClient, destination: SocketAddress, count: Int) {
            self.client = client
            self.destination = destination
            self.count = count
        }

        var finished: Bool { lock.withLock { done } }

        func run() {
            do {
                for _ in 0..<count {
                    try client.send([0x2a], to: destination)
                    sent += 1
                }
            } catch {
                failure = error
            }
            lock.withLock { done = true }
        }
    }
}
