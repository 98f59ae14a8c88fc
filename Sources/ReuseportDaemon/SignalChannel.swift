#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// The signals the daemon handles, delivered through a signalfd so the event loop sees them
/// as readable input rather than in a handler. They are blocked in the daemon; workers are
/// spawned with an empty mask (WorkerSpawn).
final class SignalChannel {
    static let handled: [Int32] = [SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR2]
    let descriptor: OwnedDescriptor

    init(_ signals: [Int32] = SignalChannel.handled) throws {
        try Syscall.blockSignals(signals)
        // A write to a peer that went away must fail with EPIPE, not kill the process.
        signal(SIGPIPE, SIG_IGN)
        descriptor = try Syscall.signalfd(signals)
    }

    /// The signals pending now (each at most once: signals of one kind coalesce).
    func drain() -> [Int32] {
        var signals: [Int32] = []
        while let signal = try? Syscall.readSignal(descriptor.fd) { signals.append(signal) }
        return signals
    }
}
