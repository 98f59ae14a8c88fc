#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// The environment a worker starts with: built from nothing, as systemd builds a service's
/// (systemd.exec(5), "Environment Variables in Spawned Processes"), never copied from the
/// daemon's own, which holds whatever the shell or unit that started it had (LD_PRELOAD,
/// credentials, proxies). The exact list is in docs/configuration.md ("What a worker gets").
///
/// 1. The base: `PATH` (systemd's default), and `HOME`, `USER`, `LOGNAME`, `SHELL` of the
///    user the worker runs as (left out for a numeric uid without a passwd entry). No `LANG`:
///    the daemon's locale is that of whoever started it; a service that wants one sets it.
/// 2. The service's `environment = ["KEY=value", ...]`, which may replace a base entry.
/// 3. What the daemon sets for the slot: socket activation (`LISTEN_FDS`, `LISTEN_FDNAMES`;
///    `LISTEN_PID` is set by the worker itself before exec) and `REUSEPORT_SLOT`,
///    `REUSEPORT_SERVICE`, `REUSEPORT_GENERATION`; for a service with QUIC steering, `REUSEPORT_QUIC_SERVER_ID`,
///    `REUSEPORT_QUIC_CID_LENGTH`, `REUSEPORT_QUIC_CONFIG_ROTATION`. A configuration may not set
///    these (`reserved`). With `preload_bind`, `LD_PRELOAD` names the bind preload library
///    (BindPreload.swift) before anything the service's own `LD_PRELOAD` names.
enum WorkerEnvironment {
    /// systemd's default for services (`DEFAULT_PATH` in src/basic/path-util.h, split /usr).
    static let defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    /// Names only the daemon sets. The systemd notification variables are reserved for the
    /// daemon's notify socket and watchdog (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID).
    static let reserved: [String] = [
        ActivationEnvironment.listenFDs, ActivationEnvironment.listenPID, ActivationEnvironment.listenFDNames,
        ActivationEnvironment.slot, ActivationEnvironment.service, ActivationEnvironment.generation,
        ActivationEnvironment.quicServerID,
        ActivationEnvironment.quicCIDLength, ActivationEnvironment.quicConfigRotation, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
    ]

    /// The environment of a worker of `service` on `slot`, with `listeners` sockets, in `generation`.
    static func make(_ service: ServiceConfiguration, listeners: Int, slot: UInt32, generation: UInt32 = 1,
                     notifySocket: String? = nil) -> [String]
    {
        var entries = base(user: service.user)
        for entry in service.environment {
            let (name, value) = split(entry)
            if let index = entries.firstIndex(where: { $0.name == name }) {
                entries[index].value = value
            } else {
                entries.append((name, value))
            }
        }
        entries += [
            (ActivationEnvironment.listenFDs, "\(listeners)"),
            (ActivationEnvironment.listenFDNames, (0..<listeners).map { "listener\($0)" }.joined(separator: ":")),
            (ActivationEnvironment.slot, "\(slot)"),
            (ActivationEnvironment.service, service.name),
            (ActivationEnvironment.generation, "\(generation)"),
        ]
        if let quic = service.quic {
            entries += [
                (ActivationEnvironment.quicServerID, QuicSteering.hex(quic.serverID(slot: slot))),
                (ActivationEnvironment.quicCIDLength, "\(quic.cidLength)"),
                (ActivationEnvironment.quicConfigRotation, "\(quic.configRotation)"),
            ]
        }
        // preload_bind: the bind preload library first, so that its bind() is the one the program
        // calls, before any the service's own LD_PRELOAD names (ld.so(8): space-separated).
        if service.preloadBind {
            let library = BindPreload.libraryPath()
            if let index = entries.firstIndex(where: { $0.name == "LD_PRELOAD" }) {
                entries[index].value = library + " " + entries[index].value
            } else {
                entries.append(("LD_PRELOAD", library))
            }
        }
        // The notification protocol (sd_notify(3)): the daemon's socket for this worker, and the
        // watchdog interval when the service has one. WATCHDOG_PID is set by the worker itself.
        if let notifySocket { entries.append((ActivationEnvironment.notifySocket, notifySocket)) }
        if service.watchdogMs > 0 { entries.append((ActivationEnvironment.watchdogUsec, "\(service.watchdogMs * 1000)")) }
        return entries.map { "\($0.name)=\($0.value)" }
    }

    /// PATH, then HOME, USER, LOGNAME and SHELL of `user` (nil: the daemon's own user).
    static func base(user: String?) -> [(name: String, value: String)] {
        var entries: [(name: String, value: String)] = [("PATH", defaultPath)]
        let entry: UnsafeMutablePointer<passwd>?
        if let user {
            entry = getpwnam(user) ?? UInt32(user).flatMap { getpwuid($0) }
        } else {
            entry = getpwuid(geteuid())
        }
        if let entry {
            let name = String(cString: entry.pointee.pw_name)
            entries += [("HOME", String(cString: entry.pointee.pw_dir)), ("USER", name), ("LOGNAME", name),
                        ("SHELL", String(cString: entry.pointee.pw_shell))]
        }
        return entries
    }

    /// The PATH a worker's exec program is looked up in (execvp(3) in `WorkerExec`).
    static func searchPath(_ service: ServiceConfiguration) -> String {
        service.environment.last { split($0).name == "PATH" }.map { split($0).value } ?? defaultPath
    }

    /// Why `entry` cannot be a configured environment entry, or nil if it can.
    static func problem(_ entry: String) -> String? {
        guard let equals = entry.firstIndex(of: "=") else { return "'\(entry)' is not of the form KEY=value" }
        let name = entry[..<equals]
        guard let first = name.utf8.first, !(0x30...0x39).contains(first),
              name.utf8.allSatisfy({ byte in
                  (0x30...0x39).contains(byte) || (0x41...0x5a).contains(byte) || (0x61...0x7a).contains(byte)
                      || byte == 0x5f
              })
        else {
            return "'\(name)' is not a valid variable name: use letters, digits and '_', not starting with a digit"
        }
        if entry.utf8.contains(0) { return "'\(name)' has a NUL byte in its value" }
        if reserved.contains(String(name)) {
            return "\(name) is set by the daemon; a configuration may not set it (reserved: "
                + reserved.joined(separator: ", ") + ")"
        }
        return nil
    }

    static func split(_ entry: String) -> (name: String, value: String) {
        guard let equals = entry.firstIndex(of: "=") else { return (entry, "") }
        return (String(entry[..<equals]), String(entry[entry.index(after: equals)...]))
    }
}
