#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Every error of the daemon's own making, one type for the layer. A failed system call is a
/// `ReuseportError` (the call, its errno and a hint), and a bad configuration a
/// `ConfigurationError` (file, key, what is wrong); what the daemon itself refuses or cannot do
/// is one of these, each a sentence that names what and why.
public enum DaemonError: Error, CustomStringConvertible {
    /// A service could not start: its name and what failed.
    case serviceStart(service: String, underlying: Error)
    /// Another daemon answers on the control socket.
    case alreadyRunning(controlSocket: String)
    /// A reuseport group that is not this daemon's holds the address (ListenerClaim).
    case listenerTaken(Endpoint)
    /// An upgrade could not start or roll back.
    case upgrade(String)
    /// A previous daemon's worker or socket could not be taken over.
    case adoption(String)
    /// `exec-worker` could not set its worker up: the sockets passed, the daemon gone, a bad fd.
    case worker(String)
    /// A user or group could not be found or taken on.
    case identity(String)

    public var description: String {
        switch self {
        case .serviceStart(let service, let underlying):
            return "service \(service): \(underlying)"
        case .alreadyRunning(let path):
            return "another reuseportd is running: its control socket \(path) answers "
                + "(use another --run-dir and --pin-dir to run a second one)"
        case .listenerTaken(let endpoint):
            return "\(endpoint) is already bound by another socket (another reuseportd, or a server using SO_REUSEPORT): "
                + "joining its reuseport group would take over that group's traffic, so the daemon will not start it"
        case .upgrade(let why), .adoption(let why), .worker(let why), .identity(let why):
            return why
        }
    }

    /// A user or group call that failed, with errno's text and what to do about EPERM.
    static func identityCall(_ call: String) -> DaemonError {
        let code = errno
        let hint = code == EPERM ? " (changing user or group needs root or CAP_SETUID/CAP_SETGID)" : ""
        return .identity("\(call): \(String(cString: strerror(code)))\(hint)")
    }
}
