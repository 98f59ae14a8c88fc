#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Why a control client got no answer. Each case names the socket and what to try.
public enum ControlClientError: Error, CustomStringConvertible, Equatable {
    /// Nothing listens at the socket (or it cannot be reached).
    case noDaemon(socket: String, reason: String)
    /// The daemon was reached but the exchange failed.
    case daemon(socket: String, reason: String)
    /// The daemon did not answer in time.
    case timeout(String)

    public var description: String {
        switch self {
        case .noDaemon(let socket, let reason):
            return "no daemon answers at \(socket): \(reason)"
                + "\n  is reuseportd running, and does --run-dir name its run folder?"
                + " (read-only commands such as `map dump` work without it)"
        case .daemon(let socket, let reason):
            return "control socket \(socket): \(reason)"
        case .timeout(let reason):
            return reason
        }
    }
}

/// The client side of the control protocol (ControlProtocol.swift): connect to the Unix
/// socket, send one JSON line, read one JSON line. reuseportctl and the tests use it.
public struct ControlClient: Sendable {
    public var socketPath: String
    /// How long the daemon may take to answer (a scale waits for new workers to start).
    public var timeoutSeconds: Double

    public init(socketPath: String, timeoutSeconds: Double = 30) {
        self.socketPath = socketPath
        self.timeoutSeconds = timeoutSeconds
    }

    /// The client of the daemon whose run folder is `runDirectory`.
    public init(runDirectory: String, timeoutSeconds: Double = 30) {
        self.init(socketPath: ControlDefaults.socketPath(runDirectory: runDirectory), timeoutSeconds: timeoutSeconds)
    }

    /// Sends `request` and decodes the daemon's answer, whether it says ok or not.
    public func send(_ request: ControlRequest) throws(ControlClientError) -> ControlResponse {
        let line: Data
        do { line = try ControlFraming.encode(request) } catch {
            throw .daemon(socket: socketPath, reason: "cannot encode the request: \(error)")
        }
        guard let answer = try exchange(line, tolerateEarlyClose: false) else {
            throw .daemon(socket: socketPath, reason: "the daemon closed without answering")
        }
        do {
            return try ControlFraming.decode(ControlResponse.self, from: answer)
        } catch {
            let text = String(decoding: answer.prefix(200), as: UTF8.self)
            throw .daemon(socket: socketPath, reason: "the answer is not a control response (\(error)): \(text)")
        }
    }

    /// Writes `bytes` as they are (a request line, or anything else) and reads the answer
    /// line without its newline. nil: the daemon closed without a byte. A daemon may close
    /// before reading everything (an oversized request): what it answered is still returned.
    public func exchange(_ bytes: Data) throws(ControlClientError) -> Data? {
        try exchange(bytes, tolerateEarlyClose: true)
    }

    private func exchange(_ bytes: Data, tolerateEarlyClose: Bool) throws(ControlClientError) -> Data? {
        let fd = try connect()
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { raw in
                Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
            }
            if written < 0 {
                if errno == EINTR { continue }
                if tolerateEarlyClose && (errno == EPIPE || errno == ECONNRESET) { break }
                throw .daemon(socket: socketPath, reason: "send: \(String(cString: strerror(errno)))")
            }
            offset += written
        }
        let answer = try readLine(fd, tolerateReset: tolerateEarlyClose)
        return answer.isEmpty ? nil : answer.prefix { $0 != 0x0a }
    }

    /// A connected socket (the caller closes it), for a client that sends by hand.
    public func connect() throws(ControlClientError) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard socketPath.utf8.count < capacity else {
            throw .noDaemon(socket: socketPath, reason: "the path is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: socketPath.utf8)
            raw[socketPath.utf8.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw .noDaemon(socket: socketPath, reason: "socket: \(String(cString: strerror(errno)))") }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if result != 0 {
            let code = errno
            close(fd)
            let reason: String
            switch code {
            case ENOENT: reason = "no such socket"
            case ECONNREFUSED: reason = "nobody listens on it (a daemon that exited left it behind?)"
            case EACCES, EPERM: reason = "permission denied (the control socket is for root, mode 0600)"
            default: reason = String(cString: strerror(code))
            }
            throw .noDaemon(socket: socketPath, reason: reason)
        }
        return fd
    }

    /// Reads until a newline or the end; empty if the daemon closed without a byte.
    private func readLine(_ fd: Int32, tolerateReset: Bool) throws(ControlClientError) -> Data {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = Self.monotonicSeconds() + timeoutSeconds
        while !data.contains(0x0a) {
            let left = deadline - Self.monotonicSeconds()
            guard left > 0 else {
                throw .timeout("the daemon at \(socketPath) did not answer within \(Int(timeoutSeconds)) s:"
                               + " it may be wedged (read-only commands such as `map dump` still work)")
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(min(left * 1000, 1000)))
            if ready < 0 && errno != EINTR {
                throw .daemon(socket: socketPath, reason: "poll: \(String(cString: strerror(errno)))")
            }
            guard ready > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 {
                if errno == EINTR { continue }
                // The daemon may reset a connection whose request it refused unread.
                if tolerateReset && errno == ECONNRESET { break }
                throw .daemon(socket: socketPath, reason: "recv: \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            data.append(contentsOf: buffer[0..<count])
            guard data.count <= ControlDefaults.maximumRequestBytes * 16 else {
                throw .daemon(socket: socketPath, reason: "the answer is longer than any valid one")
            }
        }
        return data
    }

    private static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}
