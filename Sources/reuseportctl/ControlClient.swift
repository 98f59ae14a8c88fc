#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit

/// The client side of the control protocol (Sources/ReuseportControl/ControlProtocol.swift):
/// connect, send one JSON line, read one JSON line.
struct ControlClient {
    var socketPath: String
    /// How long the daemon may take to answer (a scale waits for new workers to start).
    var timeoutSeconds: Double = 30

    func send(_ request: ControlRequest) throws -> ControlResponse {
        let fd = try connect()
        defer { close(fd) }
        let line = try ControlFraming.encode(request)
        try line.withUnsafeBytes { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = Glibc.send(fd, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
                if written < 0 {
                    if errno == EINTR { continue }
                    throw CtlError.daemon(socket: socketPath, reason: "send: \(String(cString: strerror(errno)))")
                }
                offset += written
            }
        }
        let answer = try readLine(fd)
        do {
            return try ControlFraming.decode(ControlResponse.self, from: answer)
        } catch {
            let text = String(decoding: answer.prefix(200), as: UTF8.self)
            throw CtlError.daemon(socket: socketPath, reason: "the answer is not a control response (\(error)): \(text)")
        }
    }

    /// Sends `request` and returns the response, or throws the daemon's refusal.
    func perform(_ request: ControlRequest) throws -> ControlResponse {
        let response = try send(request)
        guard response.ok else { throw CtlError.daemonRefused(response.error ?? "no reason given") }
        return response
    }

    private func connect() throws -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard socketPath.utf8.count < capacity else {
            throw CtlError.noDaemon(socket: socketPath, reason: "the path is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: socketPath.utf8)
            raw[socketPath.utf8.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw CtlError.noDaemon(socket: socketPath, reason: "socket: \(String(cString: strerror(errno)))") }
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
            throw CtlError.noDaemon(socket: socketPath, reason: reason)
        }
        return fd
    }

    private func readLine(_ fd: Int32) throws -> Data {
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = MonotonicClock.seconds() + timeoutSeconds
        while !data.contains(0x0a) {
            let left = deadline - MonotonicClock.seconds()
            guard left > 0 else {
                throw CtlError.timeout("the daemon at \(socketPath) did not answer within \(Int(timeoutSeconds)) s:"
                                       + " it may be wedged (read-only commands such as `map dump` still work)")
            }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(min(left * 1000, 1000)))
            if ready < 0 && errno != EINTR {
                throw CtlError.daemon(socket: socketPath, reason: "poll: \(String(cString: strerror(errno)))")
            }
            guard ready > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 {
                if errno == EINTR { continue }
                throw CtlError.daemon(socket: socketPath, reason: "recv: \(String(cString: strerror(errno)))")
            }
            if count == 0 {
                if data.isEmpty { throw CtlError.daemon(socket: socketPath, reason: "the daemon closed without answering") }
                break
            }
            data.append(contentsOf: buffer[0..<count])
            guard data.count <= ControlDefaults.maximumRequestBytes * 16 else {
                throw CtlError.daemon(socket: socketPath, reason: "the answer is longer than any valid one")
            }
        }
        return data.prefix { $0 != 0x0a }
    }
}
