#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportControl
import ReuseportKit

/// The daemon: owns every service's sockets and keeps a worker on every slot.
///
/// One thread, one poll() loop over a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP), the
/// control socket and its clients, and the workers' output pipes; timers (back-off,
/// readiness, failover, kill deadlines) set the poll timeout. Workers are reaped with
/// waitpid() on SIGCHLD. Nothing here blocks for long: a reload or scale runs inline
/// (binding sockets and writing maps takes milliseconds).
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

    let options: Options
    var configuration: DaemonConfiguration
    let logger: Logger
    var services: [ServiceRuntime] = []
    /// Live workers that belong to a slot.
    var workers: [pid_t: (service: ServiceRuntime, slot: SlotRecord)] = [:]
    /// Workers being stopped (restarted, scaled away, or at shutdown): pid → SIGKILL deadline.
    var retiring: [pid_t: Int64] = [:]
    var outputs: [Int32: WorkerOutput] = [:]
    let signals: SignalChannel
    var control: ControlServer?
    var stopping = false

    /// Reads the configuration. Throws `ConfigurationError` for a bad one.
    public static func loadConfiguration(path: String?) throws(ConfigurationError) -> DaemonConfiguration {
        guard let path else {
            return try ConfigurationParser.parse(DaemonConfiguration.embeddedText, file: DaemonConfiguration.embeddedName)
        }
        return try ConfigurationParser.load(path: path)
    }

    /// Binds every service's sockets, pins the maps, opens the control socket. Nothing is
    /// left behind when this throws.
    public init(configuration: DaemonConfiguration, options: Options, logger: Logger) throws {
        self.options = options
        self.configuration = configuration
        self.logger = logger
        signals = try SignalChannel()
        control = try ControlServer(runDirectory: options.runDirectory, logger: logger)
        do {
            for service in configuration.services { try startService(service) }
        } catch {
            for service in services { service.close() }
            services.removeAll()
            control?.shutdown()
            throw error
        }
    }

    /// `ownGroups`: addresses whose reuseport group is this daemon's own (a service being rebuilt
    /// or moved on reload, whose old workers may still hold their sockets): not checked as taken.
    private func startService(_ configuration: ServiceConfiguration, ownGroups: Set<Endpoint> = []) throws {
        let service: ServiceRuntime
        do {
            service = try ServiceRuntime(configuration: configuration, pinRoot: options.pinRoot, logger: logger,
                                         ownGroups: ownGroups)
        } catch {
            throw ServiceStartError(service: configuration.name, underlying: error)
        }
        services.append(service)
        let listeners = service.listeners.map(\.description).joined(separator: ", ")
        service.logger.notice(
            "service \(service.name) listening on \(listeners) with \(service.slots.count) workers, maps pinned at \(service.pins.serviceDirectory)")
        for slot in service.slots { startWorker(service, slot, now: Clock.monotonicNs()) }
    }

    // MARK: the loop

    /// Serves until SIGTERM or SIGINT has stopped every worker; then closes the sockets,
    /// removes the pins and the control socket. Returns the exit status.
    public func run() -> Int32 {
        while true {
            let now = Clock.monotonicNs()
            tick(now: now)
            if stopping && workers.isEmpty && retiring.isEmpty { break }
            var fds = [pollfd(fd: signals.fd, events: Int16(POLLIN), revents: 0)]
            if let control {
                fds.append(pollfd(fd: control.fd, events: Int16(POLLIN), revents: 0))
                fds += control.clients.keys.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            }
            fds += outputs.keys.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let timeout = nextDeadline().map { Int32(clamping: max(0, ($0 - now + 999_999) / 1_000_000)) } ?? -1
            if poll(&fds, nfds_t(fds.count), timeout) < 0 && errno != EINTR {
                logger.critical("poll: \(String(cString: strerror(errno)))")
                return 1
            }
            for entry in fds where entry.revents != 0 {
                if entry.fd == signals.fd {
                    for signal in signals.drain() { handle(signal: signal) }
                } else if let control, entry.fd == control.fd {
                    control.acceptClients(now: Clock.monotonicNs())
                } else if let output = outputs[entry.fd] {
                    if !output.readAvailable() { outputs.removeValue(forKey: entry.fd) }
                } else if let control, control.clients[entry.fd] != nil {
                    control.read(entry.fd) { handle(request: $0) }
                }
            }
        }
        for output in outputs.values { _ = output.readAvailable() }
        for service in services { service.close() }
        logger.notice("stopped: every worker exited, sockets closed, pins removed")
        return 0
    }

    func handle(signal: Int32) {
        switch signal {
        case SIGCHLD:
            reapWorkers()
        case SIGHUP:
            let response = reload()
            if !response.ok { logger.error("reload (SIGHUP): \(response.error ?? "")") }
        case SIGTERM, SIGINT:
            if stopping {
                logger.warning("second stop signal: killing every worker now")
                for pid in Array(retiring.keys) { retiring[pid] = 0 }
            } else {
                beginStop(reason: signal == SIGINT ? "SIGINT" : "SIGTERM")
            }
        default:
            break
        }
    }

    // MARK: workers

    func startWorker(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64) {
        var logger = service.logger
        logger[metadataKey: "slot"] = "\(slot.index)"
        slot.nextStartAt = nil
        do {
            let (output, writeEnd) = try WorkerOutput.pipe(logger: logger)
            defer { close(writeEnd) }
            let spawn = WorkerSpawn(executable: options.executable,
                                    arguments: workerArguments(service.configuration),
                                    environment: workerEnvironment(service, slot),
                                    sockets: service.plane.sockets(ofSlot: slot.index).map { $0.fd.rawValue },
                                    output: writeEnd)
            let pid: pid_t
            do {
                pid = try spawn.start()
            } catch {
                close(output.fd)
                throw error
            }
            output.logger[metadataKey: "pid"] = "\(pid)"
            outputs[output.fd] = output
            workers[pid] = (service, slot)
            if slot.everStarted { slot.restarts &+= 1 }
            slot.everStarted = true
            slot.pid = pid
            slot.startedAt = now
            service.transition(slot, to: slot.failedOver ? .failedOver : .starting)
            logger.info("worker started, pid \(pid)")
        } catch {
            logger.error("cannot start a worker: \(error)")
            scheduleRestart(service, slot, now: now, livedNs: 0)
        }
    }

    func workerArguments(_ service: ServiceConfiguration) -> [String] {
        var arguments = ["reuseportd", "exec-worker", "--parent", String(getpid())]
        if let user = service.user { arguments += ["--user", user] }
        if let group = service.group { arguments += ["--group", group] }
        switch service.program {
        case .builtin(let kind): arguments += ["--builtin", kind.rawValue]
        case .exec(let argv): arguments += ["--"] + argv
        }
        return arguments
    }

    func workerEnvironment(_ service: ServiceRuntime, _ slot: SlotRecord) -> [String] {
        let ours: Set<String> = [ActivationEnvironment.listenFDs, ActivationEnvironment.listenPID,
                                 ActivationEnvironment.listenFDNames, ActivationEnvironment.slot,
                                 ActivationEnvironment.service]
        var environment = ProcessEnvironment.current.filter { !ours.contains($0.key) }.map { "\($0.key)=\($0.value)" }
        let count = service.plane.listeners.count
        environment += [
            "\(ActivationEnvironment.listenFDs)=\(count)",
            "\(ActivationEnvironment.listenFDNames)=\((0..<count).map { "listener\($0)" }.joined(separator: ":"))",
            "\(ActivationEnvironment.slot)=\(slot.index)",
            "\(ActivationEnvironment.service)=\(service.name)",
        ]
        return environment
    }

    func reapWorkers() {
        let now = Clock.monotonicNs()
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { return }
            if retiring.removeValue(forKey: pid) != nil { continue }
            guard let (service, slot) = workers.removeValue(forKey: pid) else { continue }
            let lived = now - (slot.startedAt ?? now)
            slot.pid = nil
            slot.startedAt = nil
            var logger = service.logger
            logger[metadataKey: "slot"] = "\(slot.index)"
            logger.warning("worker pid \(pid) \(Daemon.describe(status: status)) after \(lived / 1_000_000) ms")
            scheduleRestart(service, slot, now: now, livedNs: lived)
        }
    }

    /// After an exit: start again at once after a healthy run, else after the back-off.
    func scheduleRestart(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64, livedNs: Int64) {
        if slot.downSince == nil { slot.downSince = now }
        let delay: Int
        (delay, slot.quickExits) = service.configuration.restart.afterExit(livedMs: Int(livedNs / 1_000_000),
                                                                           quickExits: slot.quickExits)
        if stopping { return }
        if delay == 0 {
            startWorker(service, slot, now: now)
        } else {
            slot.nextStartAt = now + delay.msAsNs
            service.transition(slot, to: slot.failedOver ? .failedOver : .backoff)
            service.logger.info("slot \(slot.index): next start in \(delay) ms")
        }
    }

    static func describe(status: Int32) -> String {
        let signal = status & 0x7f
        if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
        return "was killed by signal \(signal)"
    }

    /// Sends SIGTERM to a worker's process group; SIGKILL follows at the stop timeout.
    func retire(_ pid: pid_t, now: Int64) {
        workers.removeValue(forKey: pid)
        retiring[pid] = now + configuration.stopTimeoutMs.msAsNs
        Daemon.signal(pid, SIGTERM)
    }

    static func signal(_ pid: pid_t, _ signal: Int32) {
        // The worker leads its own process group: its children go too.
        if kill(-pid, signal) != 0 { kill(pid, signal) }
    }

    // MARK: timers

    func tick(now: Int64) {
        for service in services {
            let policy = service.configuration.restart
            for slot in service.slots {
                if slot.pid == nil, let at = slot.nextStartAt, at <= now, !stopping {
                    startWorker(service, slot, now: now)
                }
                if let started = slot.startedAt, slot.pid != nil, slot.state == .starting || slot.state == .failedOver,
                   started + policy.readyAfterMs.msAsNs <= now
                {
                    becameReady(service, slot)
                }
                if let down = slot.downSince, !slot.failedOver, !stopping,
                   down + service.configuration.failoverAfterMs.msAsNs <= now
                {
                    failOver(service, slot)
                }
            }
        }
        for (pid, deadline) in retiring where deadline <= now {
            logger.warning("worker pid \(pid) did not stop in time: SIGKILL")
            Daemon.signal(pid, SIGKILL)
            retiring[pid] = Int64.max
        }
        control?.expire(now: now)
    }

    func nextDeadline() -> Int64? {
        var deadlines: [Int64] = Array(retiring.values.filter { $0 != Int64.max })
        for service in services {
            for slot in service.slots {
                // The same conditions as in tick(): a deadline tick() would not act on stays in the
                // past, and poll() would return at once, again and again (e.g. a failover while stopping).
                if slot.pid == nil, let at = slot.nextStartAt, !stopping { deadlines.append(at) }
                if let started = slot.startedAt, slot.pid != nil, slot.state == .starting || slot.state == .failedOver {
                    deadlines.append(started + service.configuration.restart.readyAfterMs.msAsNs)
                }
                if let down = slot.downSince, !slot.failedOver, !stopping {
                    deadlines.append(down + service.configuration.failoverAfterMs.msAsNs)
                }
            }
        }
        if let control = control?.nextDeadline { deadlines.append(control) }
        return deadlines.min()
    }

    func becameReady(_ service: ServiceRuntime, _ slot: SlotRecord) {
        slot.downSince = nil
        if slot.failedOver {
            slot.failedOver = false
            service.applyFailover()
            service.logger.notice("slot \(slot.index) is healthy again: its buckets are back")
        }
        service.transition(slot, to: .running)
    }

    func failOver(_ service: ServiceRuntime, _ slot: SlotRecord) {
        slot.failedOver = true
        service.noteFailover()
        let before = service.bucketCounts()[slot.index] ?? 0
        service.applyFailover()
        service.logger.warning(
            "slot \(slot.index) down for \(service.configuration.failoverAfterMs) ms: its \(before) buckets now point at live slots (failover \(service.failovers))")
        service.transition(slot, to: .failedOver)
    }

    // MARK: stop

    func beginStop(reason: String) {
        logger.notice("\(reason): stopping \(workers.count) workers (SIGKILL after \(configuration.stopTimeoutMs) ms)")
        stopping = true
        control?.shutdown()
        control = nil
        let now = Clock.monotonicNs()
        for (pid, worker) in workers {
            worker.slot.pid = nil
            worker.slot.nextStartAt = nil
            worker.service.transition(worker.slot, to: .stopping)
            retire(pid, now: now)
        }
        for service in services {
            for slot in service.slots where slot.state != .stopping {
                slot.nextStartAt = nil
                service.transition(slot, to: .stopping)
            }
        }
    }

    // MARK: control

    func handle(request: ControlRequest) -> ControlResponse {
        switch request.command {
        case .status:
            return ControlResponse(ok: true, services: status(of: request.service))
        case .reload:
            return reload()
        case .restart:
            guard let service = request.service.flatMap(service(named:)) ?? soleService(request.service) else {
                return .failure(unknownService(request.service))
            }
            guard let index = request.slot, let slot = service.slot(index) else {
                return .failure("service \(service.name) has no slot \(request.slot.map(String.init) ?? "(none given)"): "
                    + "its slots are 0 to \(service.slots.count - 1)")
            }
            restart(service, slot)
            return ControlResponse(ok: true, message: "restarting slot \(index) of \(service.name)",
                                   services: status(of: service.name))
        case .scale:
            guard let service = request.service.flatMap(service(named:)) ?? soleService(request.service) else {
                return .failure(unknownService(request.service))
            }
            guard let workers = request.workers, (1...Int(RP_MAX_SLOTS)).contains(workers),
                  workers <= service.configuration.bucketCount
            else {
                return .failure("scale needs a worker count between 1 and "
                    + "\(min(Int(RP_MAX_SLOTS), service.configuration.bucketCount)), got \(request.workers.map(String.init) ?? "none")")
            }
            do {
                let moved = try scale(service, to: workers)
                return ControlResponse(ok: true, message: "scaled \(service.name) to \(workers) workers, \(moved) buckets moved",
                                       services: status(of: service.name))
            } catch {
                return .failure("scaling \(service.name) to \(workers) failed: \(error)")
            }
        }
    }

    func service(named name: String) -> ServiceRuntime? { services.first { $0.name == name } }

    /// Without a service name, the only service, if there is exactly one.
    func soleService(_ name: String?) -> ServiceRuntime? { name == nil && services.count == 1 ? services[0] : nil }

    func unknownService(_ name: String?) -> String {
        let names = services.map(\.name).joined(separator: ", ")
        guard let name else { return "name a service: this daemon runs \(names)" }
        return "no service named '\(name)': this daemon runs \(names)"
    }

    func status(of name: String?) -> [ServiceStatus] {
        services.filter { name == nil || $0.name == name }.map { service in
            let buckets = service.bucketCounts()
            return ServiceStatus(
                name: service.name, listeners: service.listeners.map(\.description), workers: service.slots.count,
                pinDirectory: service.pins.serviceDirectory,
                slots: service.slots.map {
                    SlotStatus(slot: $0.index, pid: $0.pid, state: $0.state.description, restarts: Int($0.restarts),
                               buckets: buckets[$0.index] ?? 0)
                },
                failovers: service.failovers)
        }
    }

    /// Starts a new worker on the slot at once and stops the old one: for a moment both
    /// read the same socket, so no datagram waits for the restart.
    func restart(_ service: ServiceRuntime, _ slot: SlotRecord) {
        let now = Clock.monotonicNs()
        if let pid = slot.pid { retire(pid, now: now) }
        slot.pid = nil
        slot.quickExits = 0
        startWorker(service, slot, now: now)
    }

    func scale(_ service: ServiceRuntime, to count: Int) throws -> Int {
        let before = service.slots.count
        let (removed, added, moved) = try service.resize(to: count)
        let now = Clock.monotonicNs()
        for slot in removed {
            if let pid = slot.pid { retire(pid, now: now) }
            service.clear(slot)
        }
        for slot in added { startWorker(service, slot, now: now) }
        service.logger.notice("workers \(before) → \(count): \(moved) of \(service.configuration.bucketCount) buckets moved")
        return moved
    }

    /// Re-reads the configuration file and applies the difference. A bad file changes nothing.
    func reload() -> ControlResponse {
        guard !stopping else { return .failure("the daemon is stopping") }
        let next: DaemonConfiguration
        do {
            next = try Daemon.loadConfiguration(path: options.configPath)
        } catch {
            return .failure("the configuration is invalid, nothing changed: \(error)")
        }
        var notes: [String] = []
        var failures: [String] = []
        let now = Clock.monotonicNs()
        let wanted = Dictionary(uniqueKeysWithValues: next.services.map { ($0.name, $0) })
        // Stop what goes (or needs new sockets) first: its addresses may be reused below.
        let keeps: (ServiceRuntime) -> Bool = { wanted[$0.name]?.dataPlaneShape == $0.configuration.dataPlaneShape }
        let ownGroups = Set(services.flatMap(\.listeners))
        for service in services where !keeps(service) {
            stopService(service, now: now)
            notes.append(wanted[service.name] == nil ? "removed \(service.name)" : "rebuilt \(service.name)")
        }
        services.removeAll { !keeps($0) }
        configuration.stopTimeoutMs = next.stopTimeoutMs
        for new in next.services {
            guard let service = service(named: new.name) else {
                do {
                    try startService(new, ownGroups: ownGroups)
                    if !notes.contains("rebuilt \(new.name)") { notes.append("added \(new.name)") }
                } catch {
                    failures.append("\(error)")
                }
                continue
            }
            let programChanged = new.program != service.configuration.program || new.user != service.configuration.user
                || new.group != service.configuration.group
            service.update(new)
            if programChanged {
                for slot in service.slots { restart(service, slot) }
                notes.append("\(service.name): workers restarted with the new program")
            }
            if new.workers != service.slots.count {
                do {
                    let moved = try scale(service, to: new.workers)
                    notes.append("\(service.name): \(new.workers) workers, \(moved) buckets moved")
                } catch {
                    failures.append("\(service.name): cannot change to \(new.workers) workers: \(error)")
                }
            }
        }
        configuration.services = services.map(\.configuration)
        let summary = notes.isEmpty ? "no change" : notes.joined(separator: "; ")
        if !failures.isEmpty {
            return ControlResponse(ok: false, error: failures.joined(separator: "; "), message: summary,
                                   services: status(of: nil))
        }
        logger.notice("configuration reloaded: \(summary)")
        return ControlResponse(ok: true, message: "reloaded: \(summary)", services: status(of: nil))
    }

    /// Stops a service's workers (in the background) and closes its sockets and pins now.
    func stopService(_ service: ServiceRuntime, now: Int64) {
        for slot in service.slots {
            if let pid = slot.pid { retire(pid, now: now) }
            slot.pid = nil
            slot.nextStartAt = nil
        }
        service.close()
        service.logger.notice("service \(service.name) stopped")
    }
}

/// A service that could not start: names it and the call that failed.
public struct ServiceStartError: Error, CustomStringConvertible {
    public var service: String
    public var underlying: Error
    public var description: String { "service \(service): \(underlying)" }
}
