#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit

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
        let connection = try connect()
        defer { connection.close() }
        var offset = 0
        while offset < bytes.count {
            do {
                offset += try bytes.withUnsafeBytes { raw in
                    try Syscall.send(connection.fd, UnsafeRawBufferPointer(rebasing: raw[offset...]),
                                     flags: Int32(MSG_NOSIGNAL))
                }
            } catch {
                let code = Self.errno(of: error)
                if tolerateEarlyClose && (code == EPIPE || code == ECONNRESET) { break }
                throw .daemon(socket: socketPath, reason: "send: \(String(cString: strerror(code)))")
            }
        }
        let answer = try readLine(connection, tolerateReset: tolerateEarlyClose)
        return answer.isEmpty ? nil : answer.prefix { $0 != 0x0a }
    }

    /// A connected socket, for a client that sends by hand.
    public func connect() throws(ControlClientError) -> OwnedDescriptor {
        let capacity = MemoryLayout.size(ofValue: sockaddr_un().sun_path)
        guard socketPath.utf8.count < capacity else {
            throw .noDaemon(socket: socketPath, reason: "the path is longer than \(capacity - 1) bytes")
        }
        let connection: OwnedDescriptor
        do {
            connection = try Syscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), "AF_UNIX")
        } catch {
            throw .noDaemon(socket: socketPath, reason: "socket: \(String(cString: strerror(Self.errno(of: error))))")
        }
        do {
            try Syscall.connect(connection.fd, unixPath: socketPath)
        } catch {
            let code = Self.errno(of: error)
            let reason: String
            switch code {
            case ENOENT: reason = "no such socket"
            case ECONNREFUSED: reason = "nobody listens on it (a daemon that exited left it behind?)"
            case EACCES, EPERM: reason = "permission denied (the control socket is for root, mode 0600)"
            default: reason = String(cString: strerror(code))
            }
            throw .noDaemon(socket: socketPath, reason: reason)
        }
        return connection
    }

    /// Reads until a newline or the end; empty if the daemon closed without a byte.
    private func readLine(_ connection: OwnedDescriptor, tolerateReset: Bool) throws(ControlClientError) -> Data {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = MonotonicClock.seconds() + timeoutSeconds
        while !data.contains(0x0a) {
            let left = deadline - MonotonicClock.seconds()
            guard left > 0 else {
                throw .timeout("the daemon at \(socketPath) did not answer within \(Int(timeoutSeconds)) s:"
                               + " it may be wedged (read-only commands such as `map dump` still work)")
            }
            let ready: Bool
            do {
                ready = try !Syscall.poll([connection.fd], timeoutMs: Int32(min(left * 1000, 1000))).isEmpty
            } catch {
                throw .daemon(socket: socketPath, reason: "poll: \(String(cString: strerror(Self.errno(of: error))))")
            }
            // Empty also when a signal ended the wait early: the deadline is checked again.
            guard ready else { continue }
            let count: Int?
            do {
                count = try Syscall.receive(connection.fd, into: &buffer)
            } catch {
                let code = Self.errno(of: error)
                // The daemon may reset a connection whose request it refused unread.
                if tolerateReset && code == ECONNRESET { break }
                throw .daemon(socket: socketPath, reason: "recv: \(String(cString: strerror(code)))")
            }
            guard let count else { continue }
            if count == 0 { break }
            data.append(contentsOf: buffer[0..<count])
            guard data.count <= ControlDefaults.maximumRequestBytes * 16 else {
                throw .daemon(socket: socketPath, reason: "the answer is longer than any valid one")
            }
        }
        return data
    }

    /// The errno of a system-layer error.
    private static func errno(of error: any Error) -> Int32 { (error as? ReuseportError)?.errno ?? EIO }
}
