#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import Foundation
import Logging
import ReuseportControl

/// The daemon's end of the control socket (ReuseportControl/ControlProtocol.swift): a Unix
/// stream socket, mode 0600, that accepts only root and the daemon's own user (checked
/// with SO_PEERCRED, so a looser mode set later would not open it to others). Each client
/// sends one JSON line and gets one JSON line back. Served from the daemon's event loop:
/// a client that does not finish its request within `requestTimeoutNs` is dropped.
final class ControlServer {
    let path: String
    let fd: Int32
    private(set) var clients: [Int32: Client] = [:]
    let logger: Logger
    static let requestTimeoutNs: Int64 = 5_000_000_000

    struct Client {
        var received: [UInt8] = []
        var deadline: Int64
        /// Set for a client of another user: its request is read, then refused.
        var refusal: String?
    }

    /// Creates the run directory and binds the socket. Refuses when another daemon answers there.
    init(runDirectory: String, logger: Logger) throws(WorkerError) {
        self.logger = logger
        path = ControlDefaults.socketPath(runDirectory: runDirectory)
        try ControlServer.makeDirectory(runDirectory)
        if ControlServer.answers(path) {
            throw WorkerError("another reuseportd is running: its control socket \(path) answers "
                + "(use another --run-dir and --pin-dir to run a second one)")
        }
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw WorkerError.system("socket(AF_UNIX)") }
        let bound = ControlServer.withAddress(path) { bind(fd, $0, $1) }
        guard bound == 0 else {
            let error = WorkerError.system("bind(\(path))")
            close(fd)
            throw error
        }
        guard chmod(path, 0o600) == 0, listen(fd, 64) == 0 else {
            let error = WorkerError.system("chmod/listen(\(path))")
            close(fd)
            throw error
        }
    }

    static func makeDirectory(_ path: String) throws(WorkerError) {
        var current = ""
        for component in path.split(separator: "/") {
            current += "/\(component)"
            if mkdir(current, 0o755) != 0 && errno != EEXIST { throw WorkerError.system("mkdir(\(current))") }
        }
    }

    /// Whether something accepts connections at `path`.
    static func answers(_ path: String) -> Bool {
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { return false }
        defer { close(probe) }
        return withAddress(path) { connect(probe, $0, $1) } == 0
    }

    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// Accepts waiting clients. Those of other users are answered with a refusal once their
    /// request is read (answering before it would race with their write).
    func acceptClients(now: Int64) {
        while true {
            let client = rpd_accept_nonblocking(fd, nil, nil)
            if client < 0 { return }
            var pid: pid_t = 0
            var uid: uid_t = 0
            var gid: gid_t = 0
            guard rpd_peer_credentials(client, &pid, &uid, &gid) == 0 else {
                close(client)
                continue
            }
            var state = Client(deadline: now + ControlServer.requestTimeoutNs)
            if uid != 0 && uid != geteuid() {
                logger.warning("control: refused a client of uid \(uid) (pid \(pid)): only root and uid \(geteuid()) may")
                state.refusal = "permission denied: only root or uid \(geteuid()) may control this daemon"
            }
            clients[client] = state
        }
    }

    /// Reads from a client; when its line is complete, answers it with `handle`.
    func read(_ client: Int32, handle: (ControlRequest) -> ControlResponse) {
        guard var state = clients[client] else { return }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(client, $0.baseAddress, $0.count) }
            if count < 0 && (errno == EAGAIN || errno == EINTR) { break }
            if count <= 0 {
                drop(client)
                return
            }
            state.received += buffer[0..<count]
            if let newline = state.received.firstIndex(of: 0x0a) {
                let line = Data(state.received[..<newline])
                clients.removeValue(forKey: client)
                let response: ControlResponse
                do {
                    let request = try ControlFraming.decodeRequest(line)
                    response = state.refusal.map(ControlResponse.failure) ?? handle(request)
                } catch {
                    response = .failure("\(error)")
                }
                reply(client, response)
                return
            }
            if state.received.count > ControlDefaults.maximumRequestBytes {
                clients.removeValue(forKey: client)
                reply(client, .failure("request longer than \(ControlDefaults.maximumRequestBytes) bytes"))
                return
            }
        }
        clients[client] = state
    }

    /// Drops clients past their deadline.
    func expire(now: Int64) {
        for (client, state) in clients where state.deadline <= now { drop(client) }
    }

    var nextDeadline: Int64? { clients.values.map(\.deadline).min() }

    private func drop(_ client: Int32) {
        clients.removeValue(forKey: client)
        close(client)
    }

    private func reply(_ client: Int32, _ response: ControlResponse) {
        defer { close(client) }
        guard let data = try? ControlFraming.encode(response) else { return }
        // Never block the loop on a client that does not read: let the socket's send buffer
        // hold the whole answer (a Unix stream write is bounded by the sender's SO_SNDBUF,
        // unix(7)), then write without blocking. SO_SNDBUFFORCE (root) passes
        // net.core.wmem_max; without it the kernel caps SO_SNDBUF there.
        var size = Int32(clamping: data.count + 64 * 1024)
        if setsockopt(client, SOL_SOCKET, SO_SNDBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            setsockopt(client, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        let written = data.withUnsafeBytes { raw -> Int in
            var offset = 0
            while offset < raw.count {
                let count = send(client, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { break }
                offset += count
            }
            return offset
        }
        if written < data.count {
            logger.warning("control: answer cut at \(written) of \(data.count) bytes: the client does not read it")
        }
    }

    /// Closes the socket and removes its file.
    func shutdown() {
        for client in clients.keys { close(client) }
        clients.removeAll()
        close(fd)
        unlink(path)
    }
}
