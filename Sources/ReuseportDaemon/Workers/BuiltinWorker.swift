#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// The built-in workers: `echo` returns each datagram (TCP: the stream) unchanged;
/// `whoami` answers each datagram (TCP: each line) with
/// `slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>`, a newline, then the payload.
/// A UDP answer larger than a datagram can be (`largestDatagram`) echoes only the start of
/// the payload, and its header ends with ` truncated=<bytes left out>`.
///
/// Single-threaded: one poll() over the activated sockets and accepted connections. They speak
/// sd_notify (`NotifyClient`): READY=1 once serving, and WATCHDOG=1 when a watchdog is set.
///
/// SIGTERM stops them gracefully, as a server should: they take no new work (they stop reading
/// their sockets and accepting: a replacement worker on the same socket takes it, and a
/// retiring slot's queue was drained before the signal), and serve their open TCP connections
/// until the clients close them, for at most `gracefulStopMs`; then they exit (the daemon sends
/// SIGKILL at `stop_timeout_ms` anyway). A worker started with SIGTERM ignored (`trap '' TERM`,
/// nohup-style) keeps ignoring it.
public struct BuiltinWorker {
    public let kind: BuiltinWorkerKind
    public let sockets: ActivatedSockets

    public init(kind: BuiltinWorkerKind, sockets: ActivatedSockets) {
        self.kind = kind
        self.sockets = sockets
    }

    /// Serves until killed. Returns only by throwing.
    public func run() throws -> Never {
        var listeners: [Int32: Bool] = [:]  // fd → is a TCP listener
        for fd in sockets.descriptors {
            let type: Int32
            do {
                type = try Syscall.getOption(fd, SOL_SOCKET, SO_TYPE, Int32.self, "fd \(fd), SO_TYPE")
            } catch let error as ReuseportError {
                throw ReuseportError.system(call: "getsockopt(fd \(fd), SO_TYPE)", errno: error.errno ?? EBADF,
                                            hint: "fd \(fd) is not a socket")
            }
            guard type == Int32(SOCK_DGRAM.rawValue) || type == Int32(SOCK_STREAM.rawValue) else {
                throw DaemonError.worker("fd \(fd) is neither a datagram nor a stream socket")
            }
            listeners[fd] = type == Int32(SOCK_STREAM.rawValue)
            try? Syscall.setNonBlocking(FileDescriptor(rawValue: fd), true)
        }
        let prefix = "slot=\(sockets.slot ?? "-") pid=\(getpid()) service=\(sockets.service ?? "-") peer="
        var connections: [Int32: Connection] = [:]
        var buffer = [UInt8](repeating: 0, count: 65536)
        let notifier = NotifyClient()
        // The watchdog runs from the worker's start, which was a while ago on a busy machine: the
        // first ping goes with READY=1.
        notifier.notify(notifier.pingInterval == nil ? "READY=1" : "READY=1\nWATCHDOG=1")
        var nextPing = notifier.pingInterval.map { MonotonicClock.nanoseconds() + $0 }
        let stopSignal = Syscall.isIgnored(SIGTERM) ? nil : try SignalChannel([SIGTERM])
        var stopBy: Int64?
        while true {
            if let deadline = stopBy, connections.isEmpty || MonotonicClock.nanoseconds() >= deadline { exit(0) }
            if let due = nextPing, let interval = notifier.pingInterval, MonotonicClock.nanoseconds() >= due {
                notifier.notify("WATCHDOG=1")
                nextPing = due + interval
            }
            var timeout = nextPing.map { Int32(clamping: max(0, ($0 - MonotonicClock.nanoseconds()) / 1_000_000)) } ?? -1
            if stopBy != nil { timeout = timeout < 0 ? 10 : min(timeout, 10) }
            let taking = stopBy == nil ? sockets.descriptors : []
            let watched = (taking + connections.keys + (stopSignal.map { [$0.descriptor.fd.rawValue] } ?? []))
                .map { FileDescriptor(rawValue: $0) }
            for ready in try Syscall.poll(watched, timeoutMs: timeout).map(\.rawValue) {
                if let stopSignal, ready == stopSignal.descriptor.fd.rawValue {
                    if !stopSignal.drain().isEmpty, stopBy == nil {
                        stopBy = MonotonicClock.nanoseconds() + Int64(BuiltinWorker.gracefulStopMs) * 1_000_000
                    }
                } else if let isListener = listeners[ready] {
                    if isListener {
                        acceptAll(ready, into: &connections)
                    } else {
                        serveDatagrams(ready, prefix: prefix, buffer: &buffer)
                    }
                } else if var connection = connections[ready] {
                    if serve(&connection, prefix: prefix, buffer: &buffer) {
                        connections[ready] = connection
                    } else {
                        connections.removeValue(forKey: ready)?.descriptor.close()
                    }
                }
            }
        }
    }

    /// How long a stopping worker keeps serving what it holds.
    static let gracefulStopMs = 2000

    struct Connection {
        let descriptor: OwnedDescriptor
        var fd: Int32 { descriptor.fd.rawValue }
        var peer: String
        var pending: [UInt8] = []
    }

    /// Answers every queued datagram.
    func serveDatagrams(_ fd: Int32, prefix: String, buffer: inout [UInt8]) {
        let socket = FileDescriptor(rawValue: fd)
        // nil: drained (EAGAIN); an error is tried again on the next poll.
        while let (count, source) = (try? Syscall.receiveFrom(socket, into: &buffer, flags: Int32(MSG_DONTWAIT))) ?? nil {
            guard let source else { continue }
            let reply: [UInt8]
            switch kind {
            case .echo:
                reply = Array(buffer[0..<count])
            case .whoami:
                reply = BuiltinWorker.whoamiDatagram(header: "\(prefix)\(source)", payload: buffer[0..<count])
            }
            // A full send buffer is waited out briefly rather than dropping the answer; an answer
            // that cannot be sent is said on stderr (the daemon logs it with the slot and pid), so
            // that a datagram a client never got an answer to is accounted for.
            var sent = false
            var failure = "the send buffer stayed full for 1 s"
            for _ in 0..<10 {
                do {
                    // nil: no room yet (EMSGSIZE cannot happen: whoamiDatagram cuts).
                    if try reply.withUnsafeBytes({ try Syscall.sendNow(socket, $0, to: source) }) != nil {
                        sent = true
                        break
                    }
                } catch {
                    failure = "\(error)"
                    break
                }
                _ = try? Syscall.waitWritable(socket, timeoutMs: 100)
            }
            if !sent {
                _ = try? FileDescriptor.standardError.writeAll(Array("\(kind.rawValue): no answer sent to \(source): \(failure)\n".utf8))
            }
        }
    }

    /// The largest UDP payload over IPv4: 65,535 bytes of IP packet less 20 of IP header and 8 of
    /// UDP header (IPv6 allows 65,527; the smaller serves both). sendto(2) of more fails with EMSGSIZE.
    static let largestDatagram = 65_507

    /// `header`, a newline and `payload`, cut to `largestDatagram`: then only the start of the
    /// payload is echoed and the header says how many bytes were left out (` truncated=N`).
    static func whoamiDatagram(header: String, payload: ArraySlice<UInt8>) -> [UInt8] {
        if header.utf8.count + 1 + payload.count <= largestDatagram { return Array("\(header)\n".utf8) + payload }
        // The count's own digits take room from the payload: settle it (twice is enough, as the
        // count only grows and its digit count changes at most once).
        var leftOut = 0
        for _ in 0..<3 {
            let room = largestDatagram - ("\(header) truncated=\(leftOut)\n".utf8.count)
            leftOut = payload.count - max(0, room)
        }
        return Array("\(header) truncated=\(leftOut)\n".utf8) + payload.dropLast(leftOut)
    }

    func acceptAll(_ fd: Int32, into connections: inout [Int32: Connection]) {
        while let (accepted, peer) = try? Syscall.accept(FileDescriptor(rawValue: fd)) {
            connections[accepted.fd.rawValue] = Connection(descriptor: accepted, peer: peer?.description ?? "?")
        }
    }

    /// Reads what the peer sent and answers it; false when the connection is finished.
    func serve(_ connection: inout Connection, prefix: String, buffer: inout [UInt8]) -> Bool {
        let count: Int
        do {
            guard let read = try Syscall.read(connection.descriptor.fd, into: &buffer) else { return true }
            count = read
        } catch {
            return false
        }
        if count == 0 { return false }
        let fd = connection.descriptor.fd
        switch kind {
        case .echo:
            return writeAll(fd, buffer[0..<count])
        case .whoami:
            connection.pending += buffer[0..<count]
            while let newline = connection.pending.firstIndex(of: 0x0a) {
                let line = connection.pending[...newline]
                guard writeAll(fd, Array("\(prefix)\(connection.peer)\n".utf8) + line) else { return false }
                connection.pending.removeSubrange(...newline)
            }
            return connection.pending.count < 65536
        }
    }

    /// Writes all of `bytes`, waiting up to 5 s at a time for room when the socket is full.
    func writeAll<C: Collection>(_ fd: FileDescriptor, _ bytes: C) -> Bool where C.Element == UInt8 {
        var remaining = Array(bytes)[...]
        while !remaining.isEmpty {
            do {
                guard let written = try remaining.withUnsafeBytes({ try Syscall.writeNow(fd, $0) }) else {
                    guard try Syscall.waitWritable(fd, timeoutMs: 5000) else { return false }
                    continue
                }
                remaining = remaining.dropFirst(written)
            } catch {
                return false
            }
        }
        return true
    }
}
