#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// The worker's side of sd_notify(3), for the built-in workers: `READY=1` once serving, and
/// `WATCHDOG=1` every half of `WATCHDOG_USEC` when the daemon asked for a watchdog (as
/// sd_watchdog_enabled(3) advises). Without `NOTIFY_SOCKET` it does nothing, so a built-in
/// worker also runs under systemd-socket-activate or by hand.
struct NotifyClient {
    private let socket: OwnedDescriptor?
    /// Half the watchdog interval, nil without a watchdog for this process.
    let pingInterval: Int64?

    init(environment: [String: String] = ProcessEnvironment.current) {
        var socket: OwnedDescriptor?
        if let path = environment[ActivationEnvironment.notifySocket], path.hasPrefix("/") {
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

    /// Sends `state` ("READY=1", "WATCHDOG=1"); a failure is dropped, as sd_notify(3) callers do.
    func notify(_ state: String) {
        guard let socket else { return }
        _ = try? Array(state.utf8).withUnsafeBytes { try Syscall.send(socket.fd, $0, flags: Int32(MSG_NOSIGNAL)) }
    }
}
