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

    /// A UDP service of one slot on `address` takes a flood from one client (its own thread)
    /// while, on this thread, `leavings` sockets join its group (bound with SO_REUSEPORT to its
    /// port: each is the newest, met first by lookups, as a slot added by a scale-up is) and leave
    /// it again, each by close alone or, with `leavingPort`, by `leavePortAndClose()`; a third
    /// thread reads slot 0 all along. None of the joining sockets is in the program's array, so
    /// the program steers every datagram to slot 0.
    public static func run(address: IPAddress = .loopbackV4, leavings: Int, leavingPort: Bool) throws -> Outcome {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(address, 0))], slotCount: 1,
                                         options: .init(receiveBuffer: 32 << 20))
        defer { plane.close() }
        let slot0 = plane.listeners[0].sockets[0]!
        let destination = plane.listeners[0].endpoint
        let client = try Traffic.clients(1, on: address)[0]
        let sender = Sender(client: client, destination: destination.address)
        let reader = Reader(socket: slot0)
        let threads = [Thread { sender.run() }, Thread { reader.run() }]
        for thread in threads { thread.start() }
        var readOff = 0
        var failure: Error?
        for _ in 0..<leavings {
            do {
                let joining = try ReuseportSocket(endpoint: destination)
                if leavingPort {
                    let (discarded, error) = joining.leavePortAndClose()
                    if let error { throw error }
                    readOff += discarded
                } else {
                    joining.close()
                }
            } catch {
                failure = error
                break
            }
        }
        sender.stop()
        let sent = sender.waitUntilDone()
        // What the loopback still carries reaches slot 0 within moments.
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        usleep(100_000)
        while MonotonicClock.nanoseconds() < deadline, (try? Syscall.queuedBytes(slot0.fd)) ?? 0 > 0 { usleep(10_000) }
        reader.stop()
        let received = reader.waitUntilDone()
        if let failure = failure ?? sender.failure { throw failure }
        return Outcome(sent: sent, received: received, readOff: readOff, drops: slot0.receiveDrops(), leavings: leavings)
    }

    /// A loop on its own thread until `stop()`; `waitUntilDone()` returns its count.
    class Loop: @unchecked Sendable {
        private let lock = NSLock()
        private var stopping = false
        private let done = DispatchSemaphore(value: 0)
        /// What the loop did: datagrams sent or read. Read by others only after `waitUntilDone()`.
        var count = 0

        var stopped: Bool { lock.withLock { stopping } }
        func stop() { lock.withLock { stopping = true } }
        func waitUntilDone() -> Int {
            done.wait()
            return count
        }
        func run() {
            while !stopped, step() {}
            finish()
            done.signal()
        }
        /// One unit of work; false ends the loop.
        func step() -> Bool { false }
        func finish() {}
    }

    /// Sends one-byte datagrams as fast as it can, after every 64 letting others run.
    final class Sender: Loop, @unchecked Sendable {
        let client: FlowClient
        let destination: SocketAddress
        private(set) var failure: Error?

        init(client: FlowClient, destination: SocketAddress) {
            self.client = client
            self.destination = destination
        }

        override func step() -> Bool {
            do {
                try client.send([0x2a], to: destination)
                count += 1
            } catch {
                failure = error
                return false
            }
            if count % 64 == 63 { sched_yield() }
            return true
        }
    }

    /// Reads slot 0 until stopped, then what is left.
    final class Reader: Loop, @unchecked Sendable {
        let socket: ReuseportSocket

        init(socket: ReuseportSocket) { self.socket = socket }

        override func step() -> Bool {
            if (try? Syscall.discardDatagram(socket.fd)) == true { count += 1 } else { usleep(200) }
            return true
        }

        override func finish() {
            count += socket.discardQueued()
        }
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
            stayed += staying.discardQueued()
            if stayed < flows { usleep(10_000) }
        }
        return (stayed, leaving.discardQueued())
    }
}
