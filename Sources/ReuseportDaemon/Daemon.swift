#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportControl
import ReuseportKit
import SystemPackage

/// The daemon's event loop: one thread, one poll() over a signalfd (SIGCHLD, SIGTERM,
/// SIGINT, SIGHUP), the control socket and its clients, the workers' notify socket
/// (NotifySocket.swift) and the workers' output pipes; the
/// supervisor's timers (SupervisorTimers.swift), the control clients' deadlines and the
/// service manager's watchdog (ServiceManagerNotifier.swift) set the poll timeout. Nothing
/// here blocks for long: a reload or scale runs inline (binding sockets and writing maps takes
/// milliseconds).
///
/// The pieces: `Supervisor` keeps a worker on every slot, `ControlCommands` answers the
/// control socket, `ConfigurationReload` applies a changed configuration file.
public final class Daemon {
    public struct Options: Sendable {
        /// nil: the embedded demo configuration.
        public var configPath: String?
        public var pinRoot: String
        public var runDirectory: String
        /// This binary, spawned as `exec-worker` to start each worker.
        public var executable: String

        public init(configPath: String?, pinRoot: String, runDirectory: String, executable: String) {
            self.configPath = configPath
            self.pinRoot = pinRoot
            self.runDirectory = runDirectory
            self.executable = executable
        }
    }

    let logger: Logger
    let options: Options
    let supervisor: Supervisor
    let commands: ControlCommands
    let signals: SignalChannel
    var control: ControlServer?
    /// systemd's NOTIFY_SOCKET (READY=1, RELOADING=1, STOPPING=1, STATUS=, WATCHDOG=1).
    let serviceManager: ServiceManagerNotifier

    /// Reads the configuration. Throws `ConfigurationError` for a bad one.
    public static func loadConfiguration(path: String?) throws(ConfigurationError) -> DaemonConfiguration {
        guard let path else {
            return try ConfigurationParser.parse(DaemonConfiguration.embeddedText, file: DaemonConfiguration.embeddedName)
        }
        return try ConfigurationParser.load(path: path)
    }

    /// Binds every service's sockets, pins the maps, opens the control socket; starts no worker
    /// (`run` does). Nothing is left behind when this throws. A pin root or run folder that
    /// anyone but root could change throws `UntrustedPathError` before anything is made.
    public init(configuration: DaemonConfiguration, options: Options, logger: Logger) throws {
        self.logger = logger
        self.options = options
        try BPFFilesystem.ensureMounted(for: options.pinRoot)
        try Daemon.checkTrusted(options.pinRoot)
        try Daemon.checkTrusted(options.runDirectory)
        signals = try SignalChannel()
        let control = try ControlServer(runDirectory: options.runDirectory, logger: logger)
        let notify: NotifySocket
        do {
            notify = try NotifySocket(runDirectory: options.runDirectory)
        } catch {
            control.shutdown()
            throw error
        }
        supervisor = Supervisor(configuration: configuration, pinRoot: options.pinRoot, executable: options.executable,
                                logger: logger)
        supervisor.notify = notify
        supervisor.inheritedOutputs = Daemon.takeInheritedOutputs()
        supervisor.inheritedSockets = InheritedSockets.fromEnvironment()
        let serviceManagerClient = NotifyClient()
        let socketStore = SocketStore(client: serviceManagerClient, logger: logger)
        supervisor.socketStore = socketStore
        serviceManager = ServiceManagerNotifier(supervisor: supervisor, client: serviceManagerClient)
        commands = ControlCommands(supervisor: supervisor,
                                   reload: ConfigurationReload(configPath: options.configPath, supervisor: supervisor,
                                                               serviceManager: serviceManager))
        do {
            for service in configuration.services { try supervisor.addService(service) }
            supervisor.inheritedSockets.closeRest(logger: logger)
            socketStore.refuseUnclaimed()
        } catch {
            supervisor.closeServices()
            control.shutdown()
            notify.close()
            throw error
        }
        self.control = control
    }

    /// Refuses a pin root or run folder that someone other than root could change. One this
    /// process may not even examine (a daemon not run as root) is left to the calls that use it,
    /// which say what they need.
    static func checkTrusted(_ path: String) throws(UntrustedPathError) {
        do throws(UntrustedPathError) {
            try TrustedPath.checkDirectory(path, missing: .allow)
        } catch {
            if error.errno == nil { throw error }
        }
    }

    /// Starts the workers and serves until SIGTERM or SIGINT has stopped every one of them;
    /// then closes the sockets, removes the pins and the control socket. Throws when the loop
    /// itself fails (a `ReuseportError`), after killing and reaping every worker and closing
    /// everything.
    public func run() throws {
        supervisor.prepareWorkers()
        DaemonPrivileges.dropUnneeded(cgroups: supervisor.cgroups, logger: logger)
        supervisor.startAllWorkers()
        supervisor.checkHealthCheckRoutes()
        do {
            try serve()
        } catch {
            control?.shutdown()
            control = nil
            supervisor.killAllAndClose()
            supervisor.notify?.close()
            throw error
        }
        // Said only when true: a worker that still runs (tracked, or named by the pins) holds its
        // service's sockets and port, and its pins stay so that a later daemon adopts it.
        let survivors = supervisor.survivingWorkers()
        // A tracked worker's service is not recorded: then every service keeps its pins.
        let keeping = survivors.contains { $0.service == nil }
            ? Set(supervisor.services.map(\.name)) : Set(survivors.compactMap(\.service))
        supervisor.closeServices(drainingOutput: true, keepingPins: keeping)
        supervisor.notify?.close()
        if survivors.isEmpty {
            logger.notice("stopped: every worker exited, sockets closed, pins removed")
        } else {
            let list = survivors.map { "\($0.service.map { "\($0) " } ?? "")pid \($0.pid)" }.joined(separator: ", ")
            logger.error("stopped, but \(survivors.count) workers still run (\(list)): their services' pins are kept for a later daemon to adopt them")
        }
    }

    private func serve() throws {
        while true {
            // Every change of the turn before is in the pins before the next exec, kill or turn.
            supervisor.publishLeaving()
            supervisor.publishCanaries()
            for service in supervisor.services { service.reportBrokenInvariants() }
            supervisor.checkWorkerTable()
            if supervisor.reexecRequested { reexec() }
            let now = MonotonicClock.nanoseconds()
            supervisor.fireTimers(now: now)
            control?.expire(now: now)
            if supervisor.isStopped { return }
            serviceManager.fireWatchdog(now: now)
            serviceManager.update()
            // Each source gets a bounded share of a round (one chunk of a worker's output, a few
            // accepted clients), so none can keep the loop from the others; a source that has
            // had its share for now (a chatty worker's second, a listener out of descriptors)
            // is left out of poll() until its deadline.
            var watched = [signals.descriptor.fd]
            if let notify = supervisor.notify { watched.append(notify.descriptor.fd) }
            if let control {
                if control.isAccepting(now: now) { watched.append(control.descriptor.fd) }
                watched += control.clients.keys
            }
            watched += supervisor.polledOutputs(now: now)
            watched += supervisor.table.pidfds
            watched += supervisor.healthProbeDescriptors
            let deadline = [supervisor.nextDeadline(), control?.nextDeadline, control?.acceptResume(now: now),
                            supervisor.nextOutputResume(now: now), serviceManager.nextWatchdog].compactMap { $0 }.min()
            let timeout = deadline.map { Int32(clamping: max(0, ($0 - now + 999_999) / 1_000_000)) } ?? -1
            for fd in try Syscall.poll(watched, timeoutMs: timeout) {
                if fd == signals.descriptor.fd {
                    for signal in signals.drain() { handle(signal: signal) }
                } else if fd == supervisor.notify?.descriptor.fd {
                    supervisor.readNotifications(now: MonotonicClock.nanoseconds())
                } else if let control, fd == control.descriptor.fd {
                    control.acceptClients(now: MonotonicClock.nanoseconds())
                } else if supervisor.table.pid(ofPidfd: fd) != nil {
                    supervisor.adoptedExited(fd)
                } else if supervisor.healthChecks.inFlight[fd] != nil {
                    supervisor.probeReadable(fd, now: MonotonicClock.nanoseconds())
                } else if supervisor.outputs[fd] != nil {
                    supervisor.readOutput(fd, now: MonotonicClock.nanoseconds())
                } else if let control, control.clients[fd] != nil {
                    control.read(fd) { commands.handle($0) }
                }
            }
        }
    }

    func handle(signal: Int32) {
        switch signal {
        case SIGCHLD:
            supervisor.reapWorkers()
        case SIGHUP:
            let response = commands.reload.apply()
            if !response.ok { logger.error("reload (SIGHUP): \(response.error ?? "")") }
        case SIGUSR2:
            if let refusal = supervisor.reexecRefusal {
                logger.error("SIGUSR2: not re-executing: \(refusal)")
            } else {
                supervisor.reexecRequested = true
            }
        case SIGTERM, SIGINT:
            if supervisor.stopping {
                logger.warning("second stop signal: killing every worker now")
                supervisor.killStoppingNow()
            } else {
                control?.shutdown()
                control = nil
                let reason = signal == SIGINT ? "SIGINT" : "SIGTERM"
                supervisor.beginStop(reason: reason)
                supervisor.lastEvent = "\(reason): stopping"
                serviceManager.stopping()
            }
        default:
            break
        }
    }
}

// MARK: exec in place

extension Daemon {
    /// The environment variable that hands the workers' output pipes to the image after an exec:
    /// `pid=fd` pairs, comma-separated.
    static let inheritedOutputsVariable = "REUSEPORTD_WORKER_OUTPUTS"

    /// Execs the reuseportd binary on disk (`Options.executable`, with this process's arguments)
    /// in this process: same pid (systemd's main PID does not change), the workers stay its
    /// children, and the new image adopts them, their sockets and the maps from the pins as after
    /// a crash (WorkerAdoption), without a datagram lost. The workers' output pipes and every
    /// slot's sockets are handed over as they are (InheritedSockets: a slot whose worker is down
    /// has no worker to give them back); everything else is close-on-exec. If the exec fails, this image
    /// serves on. A new image that exits at once leaves the workers serving; the next daemon
    /// started on the pins adopts them.
    func reexec() {
        supervisor.reexecRequested = false
        if let refusal = supervisor.reexecRefusal {
            logger.error("not re-executing: \(refusal)")
            return
        }
        let pipes = supervisor.outputs.compactMap { fd, output in output.pid.map { ($0, fd) } }
        // Every slot's sockets too: a slot whose worker is down now has no worker to give them back.
        let sockets = supervisor.services.flatMap { service in
            service.plane.liveSlots.flatMap { slot in
                service.plane.sockets(ofSlot: slot).enumerated().map {
                    (InheritedSockets.Name(service: service.name, listener: $0.offset, slot: slot), $0.element.fd)
                }
            }
        }
        let handedOver = pipes.map(\.1) + sockets.map(\.1)
        for fd in handedOver { try? Syscall.setCloseOnExec(fd, false) }
        let variables = [Daemon.inheritedOutputsVariable, InheritedSockets.variable]
        var environment = Daemon.environment().filter { entry in !variables.contains { entry.hasPrefix("\($0)=") } }
        environment.append("\(Daemon.inheritedOutputsVariable)="
            + pipes.map { "\($0.0)=\($0.1.rawValue)" }.joined(separator: ","))
        environment.append("\(InheritedSockets.variable)=\(InheritedSockets.encode(sockets))")
        logger.notice(
            "re-executing \(options.executable) in pid \(getpid()): \(supervisor.table.servingCount) workers, their sockets and the maps are taken over by the new image")
        do {
            try Syscall.execute(options.executable, arguments: CommandLine.arguments, environment: environment)
        } catch {
            logger.error("cannot re-execute \(options.executable): \(error); this image serves on")
            for fd in handedOver { try? Syscall.setCloseOnExec(fd, true) }
        }
    }

    /// This process's environment, as `NAME=value` entries.
    static func environment() -> [String] {
        var entries: [String] = []
        var cursor = environ
        while let entry = cursor.pointee {
            entries.append(String(cString: entry))
            cursor += 1
        }
        return entries
    }

    /// The output pipes the image before an exec handed over (`reexec`), by worker pid; the
    /// variable is removed. Entries that are not an open pipe are ignored.
    static func takeInheritedOutputs() -> [pid_t: OwnedDescriptor] {
        guard let value = getenv(inheritedOutputsVariable).map({ String(cString: $0) }) else { return [:] }
        unsetenv(inheritedOutputsVariable)
        var pipes: [pid_t: OwnedDescriptor] = [:]
        for pair in value.split(separator: ",") {
            let parts = pair.split(separator: "=")
            guard parts.count == 2, let pid = pid_t(parts[0]), let fd = Int32(parts[1]), fd > 2 else { continue }
            var info = stat()
            guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFIFO else { continue }
            pipes[pid] = OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
        }
        return pipes
    }
}

