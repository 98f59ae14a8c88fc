#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import ReuseportKit

/// The built-in workers: `echo` returns each datagram (TCP: the stream) unchanged;
/// `whoami` answers each datagram (TCP: each line) with
/// `slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>`, a newline, then the payload.
///
/// Single-threaded: one poll() over the activated sockets and accepted connections.
public struct BuiltinWorker {
    public let kind: BuiltinWorkerKind
    public let sockets: ActivatedSockets

    public init(kind: BuiltinWorkerKind, sockets: ActivatedSockets) {
        self.kind = kind
        self.sockets = sockets
    }

    /// Serves until killed. Returns only by throwing.
    public func run() throws(WorkerError) -> Never {
        var listeners: [Int32: Bool] = [:]  // fd → is a TCP listener
        for fd in sockets.descriptors {
            var type: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0 else {
                throw WorkerError.system("getsockopt(fd \(fd), SO_TYPE): fd \(fd) is not a socket")
            }
            guard type == Int32(SOCK_DGRAM.rawValue) || type == Int32(SOCK_STREAM.rawValue) else {
                throw WorkerError("fd \(fd) is neither a datagram nor a stream socket")
            }
            listeners[fd] = type == Int32(SOCK_STREAM.rawValue)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
        let prefix = "slot=\(sockets.slot ?? "-") pid=\(getpid()) service=\(sockets.service ?? "-") peer="
        var connections: [Int32: Connection] = [:]
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            var fds = sockets.descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            fds += connections.keys.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                throw WorkerError.system("poll")
            }
            for entry in fds where entry.revents != 0 {
                if let isListener = listeners[entry.fd] {
                    if isListener {
                        acceptAll(entry.fd, into: &connections)
                    } else {
                        serveDatagrams(entry.fd, prefix: prefix, buffer: &buffer)
                    }
                } else if var connection = connections[entry.fd] {
                    if serve(&connection, prefix: prefix, buffer: &buffer) {
                        connections[entry.fd] = connection
                    } else {
                        close(entry.fd)
                        connections.removeValue(forKey: entry.fd)
                    }
                }
            }
        }
    }

    struct Connection {
        let fd: Int32
        var peer: String
        var pending: [UInt8] = []
    }

    /// Answers every queued datagram.
    func serveDatagrams(_ fd: Int32, prefix: String, buffer: inout [UInt8]) {
        while true {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let count = buffer.withUnsafeMutableBytes { bytes in
                withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, &length)
                    }
                }
            }
            if count < 0 { return }  // EAGAIN: drained (other errors: try again on the next poll)
            let reply: [UInt8]
            switch kind {
            case .echo:
                reply = Array(buffer[0..<count])
            case .whoami:
                let peer = SocketAddress(storage: storage)?.description ?? "?"
                reply = Array("\(prefix)\(peer)\n".utf8) + buffer[0..<count]
            }
            // A full send buffer (EAGAIN, ENOBUFS) is waited out briefly rather than dropping the answer.
            for _ in 0..<10 {
                let sent = reply.withUnsafeBytes { bytes in
                    withUnsafePointer(to: &storage) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            sendto(fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, length)
                        }
                    }
                }
                guard sent < 0, errno == EAGAIN || errno == ENOBUFS || errno == EINTR else { break }
                var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&entry, 1, 100)
            }
        }
    }

    func acceptAll(_ fd: Int32, into connections: inout [Int32: Connection]) {
        while true {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let accepted = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    rpd_accept_nonblocking(fd, $0, &length)
                }
            }
            if accepted < 0 { return }
            connections[accepted] = Connection(fd: accepted, peer: SocketAddress(storage: storage)?.description ?? "?")
        }
    }

    /// Reads what the peer sent and answers it; false when the connection is finished.
    func serve(_ connection: inout Connection, prefix: String, buffer: inout [UInt8]) -> Bool {
        let fd = connection.fd
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 { return errno == EAGAIN || errno == EINTR }
        if count == 0 { return false }
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

    /// Writes all of `bytes`, waiting for room when the socket is full.
    func writeAll<C: Collection>(_ fd: Int32, _ bytes: C) -> Bool where C.Element == UInt8 {
        var remaining = Array(bytes)[...]
        while !remaining.isEmpty {
            let written = remaining.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if written < 0 {
                guard errno == EAGAIN || errno == EINTR else { return false }
                var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                guard poll(&entry, 1, 5000) > 0 else { return false }
                continue
            }
            remaining = remaining.dropFirst(written)
        }
        return true
    }
}
