#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import ReuseportControl
import ReuseportKit
import SystemPackage

/// The daemon's end of the control socket (ReuseportControl/ControlProtocol.swift): a Unix
/// stream socket, mode 0600, that accepts only root and the daemon's own user (checked
/// with SO_PEERCRED, so a looser mode set later would not open it to others). Each client
/// sends one JSON line and gets one JSON line back. Served from the daemon's event loop:
/// a client that does not finish its request within `requestTimeoutNs` is dropped.
final class ControlServer {
    let path: String
    let descriptor: OwnedDescriptor
    private(set) var clients: [FileDescriptor: Client] = [:]
    let logger: Logger
    static let requestTimeoutNs: Int64 = 5_000_000_000
    /// The most clients accepted in one loop round.
    static let acceptsPerRound = 16
    /// While accept4 fails for want of descriptors or memory, the listening socket stays
    /// readable (the connection waits in the backlog), so poll() would return at once again
    /// and again: the socket is left out of poll() for this long instead.
    static let acceptRetryNs: Int64 = 250_000_000
    /// Until when the listening socket is not polled (accept4 ran out of descriptors).
    private var acceptPausedUntil: Int64?
    /// Since when accept4 has been failing, and how often: logged once when it starts, once when it ends.
    private var acceptFailing: (since: Int64, attempts: Int)?

    struct Client {
        let descriptor: OwnedDescriptor
        var received: [UInt8] = []
        var deadline: Int64
        /// Set for a client of another user: its request is read, then refused.
        var refusal: String?
    }

    /// The run folder's mode when the daemon makes it. Search (x) for everyone, read and write
    /// for root alone: a worker of any `user` must reach `notify.sock` in it (NotifySocket, mode
    /// 0666; who sent a notification is the kernel's word, not the path's), as any process
    /// reaches systemd's /run/systemd/notify. Nobody else can list the folder or add, rename or
    /// remove a name in it, and the control socket in it stays root's: mode 0600, and SO_PEERCRED
    /// refuses any other user even if the mode were looser.
    static let runDirectoryMode: mode_t = 0o711

    /// Creates the run directory (`runDirectoryMode`; an existing one must be a real folder only
    /// root can change: `TrustedPath`, and gets search for everyone if it lacks it) and binds the
    /// socket. Refuses when another daemon answers there.
    init(runDirectory: String, logger: Logger) throws {
        self.logger = logger
        path = ControlDefaults.socketPath(runDirectory: runDirectory)
        try TrustedPath.makeDirectory(runDirectory, mode: ControlServer.runDirectoryMode)
        try ControlServer.letWorkersThrough(runDirectory, logger: logger)
        if ControlServer.answers(path) { throw DaemonError.alreadyRunning(controlSocket: path) }
        unlink(path)
        descriptor = try Syscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), nonBlocking: true, "AF_UNIX")
        try Syscall.bind(descriptor.fd, unixPath: path)
        try Syscall.retrying("chmod(\(path))") { chmod(path, 0o600) }
        try Syscall.listen(descriptor.fd, backlog: 64, path)
    }

    /// A run folder made 0700 (by an older daemon, which left it at /run/reuseportd, or by hand)
    /// gets search for group and others: without it every worker running as another user got
    /// EACCES at notify.sock, never became ready and was killed by its watchdog. A folder above
    /// it that lets not everyone through is logged, not changed: it is not the daemon's.
    static func letWorkersThrough(_ runDirectory: String, logger: Logger) throws {
        let info = try Syscall.linkStatus(runDirectory)
        let search: mode_t = 0o011
        if info.st_mode & search != search {
            let mode = (info.st_mode & 0o7777) | search
            try Syscall.retrying("chmod(\(runDirectory))") { chmod(runDirectory, mode) }
            logger.notice("run folder \(runDirectory): mode \(UntrustedPathError.octal(info.st_mode)) → \(UntrustedPathError.octal(mode)), so that workers of any user reach \(NotifySocket.name)")
        }
        var folder = runDirectory
        while let slash = folder.lastIndex(of: "/"), slash != folder.startIndex {
            folder = String(folder[..<slash])
            guard let above = try? Syscall.linkStatus(folder) else { break }
            if above.st_mode & 0o001 == 0 {
                let mode = UntrustedPathError.octal(above.st_mode)
                logger.warning("workers running as another user cannot reach \(runDirectory)/\(NotifySocket.name): \(folder) (mode \(mode)) lets only its owner and group through")
                break
            }
        }
    }

    /// Whether something accepts connections at `path`.
    static func answers(_ path: String) -> Bool {
        guard let probe = try? Syscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), "AF_UNIX") else { return false }
        return withExtendedLifetime(probe) { (try? Syscall.connect(probe.fd, unixPath: path)) != nil }
    }

    /// Whether the listening socket is to be polled at `now`.
    func isAccepting(now: Int64) -> Bool { acceptPausedUntil.map { $0 <= now } ?? true }

    /// When the listening socket is polled again; nil while it is (a past time is no deadline:
    /// poll() would return at once, again and again).
    func acceptResume(now: Int64) -> Int64? { acceptPausedUntil.flatMap { $0 > now ? $0 : nil } }

    /// Accepts waiting clients (at most `acceptsPerRound`). Those of other users are answered
    /// with a refusal once their request is read (answering before it would race with their write).
    func acceptClients(now: Int64) {
        acceptPausedUntil = nil
        for _ in 0..<ControlServer.acceptsPerRound {
            let accepted: (descriptor: OwnedDescriptor, peer: SocketAddress?)?
            do {
                accepted = try Syscall.accept(descriptor.fd)
            } catch let error as ReuseportError where [EMFILE, ENFILE, ENOBUFS, ENOMEM].contains(error.errno ?? 0) {
                pauseAccepting(error, now: now)
                return
            } catch let error as ReuseportError where error.errno == ECONNABORTED {
                continue  // that client is gone; the next may not be
            } catch {
                logger.warning("control: \(error)")
                break
            }
            guard let (client, _) = accepted else { break }
            if let failing = acceptFailing {
                let after = "after \((now - failing.since) / 1_000_000) ms (\(failing.attempts) attempts failed)"
                logger.notice("control: accepting clients again \(after)")
                acceptFailing = nil
            }
            guard let (pid, uid, _) = try? Syscall.peerCredentials(client.fd) else { continue }
            var state = Client(descriptor: client, deadline: now + ControlServer.requestTimeoutNs)
            if uid != 0 && uid != geteuid() {
                logger.warning("control: refused a client of uid \(uid) (pid \(pid)): only root and uid \(geteuid()) may")
                state.refusal = "permission denied: only root or uid \(geteuid()) may control this daemon"
            }
            clients[client.fd] = state
        }
    }

    private func pauseAccepting(_ error: ReuseportError, now: Int64) {
        acceptPausedUntil = now + ControlServer.acceptRetryNs
        if let failing = acceptFailing {
            acceptFailing = (failing.since, failing.attempts + 1)
            return
        }
        acceptFailing = (now, 1)
        var why = "\(error)"
        if error.errno == EMFILE, let limit = try? Syscall.openFileLimit() {
            why += ": the daemon holds its limit of \(limit.soft) open descriptors (RLIMIT_NOFILE, hard limit "
                + "\(limit.hard)); raise it (ulimit -n, LimitNOFILE= in the unit) or run fewer workers"
        } else if error.errno == ENFILE {
            why += ": the system's limit of open files is reached (fs.file-max)"
        }
        let retry = "they wait in the backlog, tried again every \(ControlServer.acceptRetryNs / 1_000_000) ms"
        logger.error("control: cannot accept clients: \(why); \(retry) (logged again when it works)")
    }

    /// Reads from a client; when its line is complete, answers it with `handle`.
    func read(_ client: FileDescriptor, handle: (ControlRequest) -> ControlResponse) {
        guard var state = clients[client] else { return }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count: Int?
            do {
                count = try Syscall.read(client, into: &buffer)
            } catch {
                count = 0
            }
            guard let count else { break }
            if count == 0 {
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
                reply(state.descriptor, response)
                return
            }
            if state.received.count > ControlDefaults.maximumRequestBytes {
                clients.removeValue(forKey: client)
                reply(state.descriptor, .failure("request longer than \(ControlDefaults.maximumRequestBytes) bytes"))
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

    private func drop(_ client: FileDescriptor) {
        clients.removeValue(forKey: client)?.descriptor.close()
    }

    private func reply(_ client: OwnedDescriptor, _ response: ControlResponse) {
        defer { client.close() }
        guard let data = try? ControlFraming.encode(response) else { return }
        // Never block the loop on a client that does not read: let the socket's send buffer
        // hold the whole answer (a Unix stream write is bounded by the sender's SO_SNDBUF,
        // unix(7)), then write without blocking. SO_SNDBUFFORCE (root) passes
        // net.core.wmem_max; without it the kernel caps SO_SNDBUF there.
        let size = Int32(clamping: data.count + 64 * 1024)
        if (try? Syscall.setOption(client.fd, SOL_SOCKET, SO_SNDBUFFORCE, size, "SO_SNDBUFFORCE")) == nil {
            try? Syscall.setOption(client.fd, SOL_SOCKET, SO_SNDBUF, size, "SO_SNDBUF")
        }
        let written = data.withUnsafeBytes { raw -> Int in
            var offset = 0
            while offset < raw.count {
                let rest = UnsafeRawBufferPointer(rebasing: raw[offset...])
                guard let count = try? Syscall.send(client.fd, rest, flags: Int32(MSG_DONTWAIT | MSG_NOSIGNAL)), count > 0
                else { break }
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
        for client in clients.values { client.descriptor.close() }
        clients.removeAll()
        descriptor.close()
        unlink(path)
    }
}
