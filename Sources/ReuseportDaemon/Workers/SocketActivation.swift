#if canImport(Glibc)
import Glibc
#endif

/// The environment a worker is started with, the systemd way (sd_listen_fds(3)):
/// its sockets from fd 3 on, `LISTEN_FDS`, `LISTEN_PID` (the worker's own pid),
/// `LISTEN_FDNAMES`, and from reuseportd also `REUSEPORT_SLOT` and `REUSEPORT_SERVICE`; and
/// the notification protocol (sd_notify(3)): `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`.
public enum ActivationEnvironment {
    public static let firstDescriptor: Int32 = 3
    public static let listenFDs = "LISTEN_FDS"
    public static let listenPID = "LISTEN_PID"
    public static let listenFDNames = "LISTEN_FDNAMES"
    public static let slot = "REUSEPORT_SLOT"
    public static let service = "REUSEPORT_SERVICE"
    /// The worker's generation: a number never given twice for the service (docs/configuration.md).
    public static let generation = "REUSEPORT_GENERATION"
    public static let notifySocket = "NOTIFY_SOCKET"
    public static let watchdogUsec = "WATCHDOG_USEC"
    /// Set by systemd 254 and later to the unit's `FileDescriptorStoreMax=` when it is not 0:
    /// whether, and how many, descriptors the daemon may keep in the fd store.
    public static let fdStore = "FDSTORE"
    /// Set by the worker itself (exec-worker), as LISTEN_PID: only the child knows its pid.
    public static let watchdogPID = "WATCHDOG_PID"
    /// QUIC connection-ID steering (docs/quic.md): the worker's server ID in hex, the length of
    /// the CIDs it must issue, and the config rotation (the top 3 bits of their first octet).
    public static let quicServerID = "REUSEPORT_QUIC_SERVER_ID"
    public static let quicCIDLength = "REUSEPORT_QUIC_CID_LENGTH"
    public static let quicConfigRotation = "REUSEPORT_QUIC_CONFIG_ROTATION"
}

/// The sockets a worker was handed, read from its environment.
public struct ActivatedSockets: Sendable {
    public var descriptors: [Int32]
    public var names: [String]
    /// `REUSEPORT_SLOT`, when started by reuseportd.
    public var slot: String?
    /// `REUSEPORT_SERVICE`, when started by reuseportd.
    public var service: String?

    /// Reads and checks `LISTEN_*` as sd_listen_fds() does: `LISTEN_PID` must be this
    /// process, the descriptors are made close-on-exec, and the variables are removed so
    /// that a child of the worker does not take them for its own.
    public static func fromEnvironment() throws(DaemonError) -> ActivatedSockets {
        let environment = ProcessEnvironment.current
        guard let sockets = try take(from: environment, limit: 1023) else {
            throw DaemonError.worker("no sockets were passed (LISTEN_FDS is not set): start this worker from reuseportd, "
                + "or under systemd-socket-activate (e.g. systemd-socket-activate --datagram -l 5300 reuseportd worker whoami)")
        }
        return sockets
    }

    /// What `environment` passes to this process, as sd_listen_fds_with_names(3) reads it: nil
    /// without `LISTEN_FDS`. The one reader of `LISTEN_*`, for workers and for the daemon (which
    /// systemd starts with the sockets of its fd store, SocketStore.swift). Throws when the
    /// variables are malformed, name another process (`LISTEN_PID`) or more than `limit`
    /// descriptors, or one of them is not open. Takes them: close-on-exec, and the variables
    /// are removed from this process's environment so that no child takes them for its own.
    static func take(from environment: [String: String], limit: Int) throws(DaemonError) -> ActivatedSockets? {
        guard let countText = environment[ActivationEnvironment.listenFDs] else { return nil }
        guard let count = Int(countText), count > 0, count <= limit else {
            throw DaemonError.worker("LISTEN_FDS=\(countText) is not a number of sockets (1 to \(limit))")
        }
        if let pidText = environment[ActivationEnvironment.listenPID] {
            guard let pid = Int32(pidText), pid == getpid() else {
                throw DaemonError.worker("LISTEN_PID=\(pidText) is not this process (\(getpid())): the sockets are meant for another")
            }
        }
        let descriptors = (0..<Int32(count)).map { ActivationEnvironment.firstDescriptor + $0 }
        for fd in descriptors {
            guard fcntl(fd, F_SETFD, FD_CLOEXEC) == 0 else {
                throw DaemonError.worker("fd \(fd) of LISTEN_FDS=\(count) is not open: \(String(cString: strerror(errno)))")
            }
        }
        var names = environment[ActivationEnvironment.listenFDNames]?.split(separator: ":", omittingEmptySubsequences: false)
            .map(String.init) ?? []
        if names.count != count { names = descriptors.map { "fd\($0)" } }
        for name in [ActivationEnvironment.listenFDs, ActivationEnvironment.listenPID, ActivationEnvironment.listenFDNames] {
            unsetenv(name)
        }
        return ActivatedSockets(descriptors: descriptors, names: names,
                                slot: environment[ActivationEnvironment.slot],
                                service: environment[ActivationEnvironment.service])
    }
}


/// The process environment as a dictionary (reading `environ`).
enum ProcessEnvironment {
    static var current: [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let text = String(cString: entry)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }
}
