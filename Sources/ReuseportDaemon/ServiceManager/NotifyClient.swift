#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// The sending side of sd_notify(3), used twice: by the built-in workers towards the daemon
/// (`READY=1` once serving, `WATCHDOG=1`), and by the daemon towards its own service manager
/// (ServiceManagerNotifier.swift, and SocketStore.swift for the fd store, whose messages pass
/// descriptors along). `WATCHDOG=1` is due every half of `WATCHDOG_USEC` when a
/// watchdog is asked for (as sd_watchdog_enabled(3) advises). `NOTIFY_SOCKET` is a path or, with
/// a leading "@", an abstract socket name. Without it nothing is sent, so a built-in worker also
/// runs under systemd-socket-activate or by hand, and the daemon from a shell.
struct NotifyClient {
    private let socket: OwnedDescriptor?
    /// Half the watchdog interval, nil without a watchdog for this process.
    let pingInterval: Int64?

    init(environment: [String: String] = ProcessEnvironment.current) {
        var socket: OwnedDescriptor?
        if let path = environment[ActivationEnvironment.notifySocket], path.hasPrefix("/") || path.hasPrefix("@") {
            socket = try? Syscall.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), nonBlocking: true, "NOTIFY_SOCKET")
            if let opened = socket, (try? Syscall.connect(opened.fd, unixPath: path)) == nil { socket = nil }
        }
        self.socket = socket
        // WATCHDOG_PID, when set, names the process the watchdog is for (sd_watchdog_enabled(3)).
        let forUs = environment[ActivationEnvironment.watchdogPID].map { $0 == String(getpid()) } ?? true
        if socket != nil, forUs, let usec = environment[ActivationEnvironment.watchdogUsec].flatMap(Int64.init),
           usec > 0 {
            pingInterval = usec * 1000 / 2
        } else {
            pingInterval = nil
        }
    }

    /// Whether there is a socket to send to.
    var isConnected: Bool { socket != nil }

    /// Sends `state` ("READY=1", "WATCHDOG=1"); a failure is dropped, as sd_notify(3) callers do.
    func notify(_ state: String) {
        guard let socket else { return }
        _ = try? Array(state.utf8).withUnsafeBytes { try Syscall.send(socket.fd, $0, flags: Int32(MSG_NOSIGNAL)) }
    }

    /// Sends `state` with `descriptors` passed along (SCM_RIGHTS), as sd_pid_notify_with_fds(3)
    /// does: the service manager gets its own copies. Unlike `notify`, a failure is thrown: a
    /// socket that did not reach the fd store is one a restart will not find.
    func notify(_ state: String, passing descriptors: [FileDescriptor]) throws {
        guard let socket else { return }
        try Syscall.send(socket.fd, Array(state.utf8), passing: descriptors)
    }

    /// The fd store's messages (systemd's docs/FILE_DESCRIPTOR_STORE.md): the descriptor sent
    /// along is kept under `name`; `FDSTOREREMOVE=1` drops every descriptor kept under `name`.
    static func storeMessage(name: String) -> String { "FDSTORE=1\nFDNAME=\(name)" }
    static func removeMessage(name: String) -> String { "FDSTOREREMOVE=1\nFDNAME=\(name)" }
}
