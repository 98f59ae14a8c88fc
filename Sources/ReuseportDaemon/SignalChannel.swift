#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess

/// The signals the daemon handles, delivered through a signalfd so the event loop sees them
/// as readable input rather than in a handler. They are blocked in the daemon; workers are
/// spawned with an empty mask (WorkerSpawn).
final class SignalChannel {
    static let handled: [Int32] = [SIGCHLD, SIGTERM, SIGINT, SIGHUP]
    let fd: Int32

    init() throws(WorkerError) {
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in SignalChannel.handled { sigaddset(&mask, signal) }
        guard sigprocmask(SIG_BLOCK, &mask, nil) == 0 else { throw WorkerError.system("sigprocmask") }
        // A write to a control client that went away must fail with EPIPE, not kill the daemon.
        signal(SIGPIPE, SIG_IGN)
        fd = rpd_signalfd(&mask)
        guard fd >= 0 else { throw WorkerError.system("signalfd") }
    }

    /// The signals pending now (each at most once: signals of one kind coalesce).
    func drain() -> [Int32] {
        var signals: [Int32] = []
        while true {
            let signal = rpd_signalfd_read(fd)
            if signal <= 0 { return signals }
            signals.append(signal)
        }
    }

    deinit { close(fd) }
}
