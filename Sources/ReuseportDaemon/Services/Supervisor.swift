#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit
import SystemPackage

/// Keeps a worker on every slot of every service: starts workers, reaps them on SIGCHLD,
/// restarts them after a back-off, fails a slot's buckets over while it is down, and stops
/// workers (SIGTERM to every process of the worker, SIGKILL at the stop timeout). Its
/// deadlines are in SupervisorTimers.swift. Workers are reaped with waitpid(); whatever a
/// worker forks is tracked with it (`WorkerProcesses`) and stopped with it, also when the
/// worker exits by itself and leaves children behind.
final class Supervisor {
    var configuration: DaemonConfiguration
    let pinRoot: String
    /// This binary, spawned as `exec-worker` to start each worker.
    let executable: String
    let logger: Logger
    var services: [ServiceRuntime] = []
    /// Every worker started or taken over, until it and its processes are gone: serving a slot,
    /// draining a removed one, or stopping (WorkerTable).
    var table = WorkerTable()
    /// Where each worker start gets a cgroup (nil: process groups only). Set by `prepareWorkers`.
    private(set) var cgroups: WorkerCgroups?
    private var workerStarts = 0
    /// The workers' output pipes, by their read end.
    private(set) var outputs: [FileDescriptor: WorkerOutput] = [:]
    /// Output lines not logged (rate limit), by service name and slot, since the daemon started.
    private var outputDrops: [String: [UInt32: OutputDrops]] = [:]
    private(set) var stopping = false
    /// The workers' NOTIFY_SOCKET (set by the daemon; nil in tests of the supervisor alone).
    var notify: NotifySocket?
    /// systemd's fd store: keeps every slot's sockets across a restart (set by the daemon).
    var socketStore: SocketStore?
    /// When the stall check next samples the slots' sockets (WorkerLiveness.swift).
    var nextStallCheck: Int64?
    /// sock_diag failed at the last stall check (logged once).
    var stallCheckFailing = false
    /// The stall check's netlink socket, kept open: a daemon out of descriptors still samples.
    var sockDiag: OwnedDescriptor?
    /// When this image of the daemon started (CLOCK_REALTIME): `status` says it, so that a
    /// client sees an exec in place happen.
    let imageStartedAtNs = WallClock.nanoseconds()
    /// A `reexec` was asked for (control request or SIGUSR2): the loop execs once the answer is out.
    var reexecRequested = false
    /// The workers' output pipes an exec of this daemon handed over, by worker pid: the adopted
    /// workers' output goes on being read (`WorkerOutput.inherited`).
    var inheritedOutputs: [pid_t: OwnedDescriptor] = [:]
    /// The slot sockets an exec of this daemon handed over (the services take theirs as they start).
    var inheritedSockets = InheritedSockets()
    /// The last thing that happened (a worker exit, a reload, the stop), one line for the
    /// service manager's `STATUS=` (ServiceManagerNotifier).
    var lastEvent: String?
    /// Active health checks: each slot's record and the probes in flight (HealthCheck.swift).
    let healthChecks = HealthChecks()

    init(configuration: DaemonConfiguration, pinRoot: String, executable: String, logger: Logger) {
        self.configuration = configuration
        self.pinRoot = pinRoot
        self.executable = executable
        self.logger = logger
    }

    /// What `WorkerTable.violations` found broken between the table and the slots since the
    /// daemon started (the last few; a bug if ever not empty), and how many.
    private(set) var workerInvariantViolations: [String] = []
    private var lastWorkerViolations: Set<String> = []

    /// Checks the worker table against the slots once a turn of the loop, when everything the
    /// turn did is done; logs what is newly broken.
    func checkWorkerTable() {
        let found = Set(table.violations(services: services))
        for broken in found.subtracting(lastWorkerViolations).sorted() {
            logger.error("worker table invariant broken (a bug; please report it): \(broken)")
            workerInvariantViolations = Array((workerInvariantViolations + ["workers: " + broken]).suffix(16))
        }
        lastWorkerViolations = found
    }

    /// Stopping, and every worker has exited.
    var isStopped: Bool { stopping && table.servingCount == 0 && table.stoppingPids.isEmpty && table.drainingPids.isEmpty }

    // MARK: services

    /// Binds a service's sockets, loads its program and pins its maps; starts no worker.
    /// `ownGroups`: addresses whose reuseport group is this daemon's own (a service being rebuilt
    /// or moved on reload, whose old workers may still hold their sockets): not checked as taken.
    @discardableResult
    func addService(_ configuration: ServiceConfiguration, ownGroups: Set<Endpoint> = []) throws -> ServiceRuntime {
        let service: ServiceRuntime
        do {
            service = try ServiceRuntime(configuration: configuration, pinRoot: pinRoot, logger: logger,
                                         ownGroups: ownGroups, inherited: inheritedSockets.take(service: configuration.name),
                                         store: socketStore)
        } catch {
            throw DaemonError.serviceStart(service: configuration.name, underlying: error)
        }
        services.append(service)
        socketStore?.store(service)
        let listeners = service.listeners.map(\.description).joined(separator: ", ")
        service.logger.notice(
            "service \(service.name) listening on \(listeners) with \(service.slots.count) workers, maps pinned at \(service.pins.serviceDirectory)")
        return service
    }

    /// Builds a service's data plane beside what runs (on reload), make-before-break: sockets
    /// bound (joining the running group where the address is the same), program loaded, maps
    /// written; nothing attached, pinned or started. `replace(_:with:)` puts it in service;
    /// `close()` discards it and changes nothing.
    func stageService(_ configuration: ServiceConfiguration, ownGroups: Set<Endpoint>,
                      predecessor: ServiceRuntime?) throws -> ServiceRuntime {
        do {
            return try ServiceRuntime(configuration: configuration, pinRoot: pinRoot, logger: logger,
                                      ownGroups: ownGroups, staged: true, predecessor: predecessor)
        } catch {
            throw DaemonError.serviceStart(service: configuration.name, underlying: error)
        }
    }

    /// Puts a staged service in service, in place of `old` if given: starts its workers on its
    /// sockets (which get no traffic yet), switches every group to its program at once, waits
    /// until the old sockets hold no datagram (after the switch none enters them; the old
    /// workers answer what is queued), then stops the old workers, closes the old sockets,
    /// and pins the new maps where the old ones were. If the switch fails, the new service is
    /// discarded, the old one serves on, and the error is thrown.
    func replace(_ old: ServiceRuntime?, with new: ServiceRuntime) throws {
        startWorkers(of: new)
        do {
            try new.takeOver(from: old)
        } catch {
            discard(new)
            throw DaemonError.serviceStart(service: new.name, underlying: error)
        }
        // The new sockets take the old ones' names in the fd store: the old go first (a removal
        // drops every descriptor of a name).
        if let old { socketStore?.remove(old) }
        socketStore?.store(new)
        if let old {
            // After the switch nothing enters the old sockets; their workers read what is queued
            // there, and are stopped once it is read (SlotDrain), without holding up the loop.
            let now = MonotonicClock.nanoseconds()
            let sockets = (try? old.plane.handOverSockets()) ?? [:]
            for slot in old.slots {
                let drain = SlotDrain(service: new, slot: slot.index, sockets: sockets[slot.index] ?? [],
                                      deadline: now + configuration.stopTimeoutMs.msAsNs, now: now, kind: "replaced")
                if let pid = slot.pid {
                    table.leaveSlot(pid)
                    table.startDrain(pid, drain)
                } else {
                    finish(drain, reason: "it had no worker")
                    releaseSockets(drain)
                }
                slot.pid = nil
                slot.nextStartAt = nil
            }
            old.close()
        }
        if let index = services.firstIndex(where: { $0 === old }) { services[index] = new } else { services.append(new) }
        let listeners = new.listeners.map(\.description).joined(separator: ", ")
        do {
            try new.pinInPlace()
        } catch {
            new.logger.error("service \(new.name) serves, but its maps could not be pinned: \(error)")
            throw DaemonError.serviceStart(service: new.name, underlying: error)
        }
        new.logger.notice(
            "service \(new.name) listening on \(listeners) with \(new.slots.count) workers, maps pinned at \(new.pins.serviceDirectory)")
    }

    /// Stops a staged service that did not take over: its workers, its sockets (its pins are
    /// not its own yet).
    private func discard(_ service: ServiceRuntime) {
        let now = MonotonicClock.nanoseconds()
        for slot in service.slots {
            if let pid = slot.pid { stopWorker(pid, now: now) }
            slot.pid = nil
        }
        // Its sockets joined the groups of the service it was to replace, which serves on: they
        // leave the port before they close (its workers never got a datagram to answer).
        service.close(leavingPort: true)
    }

    /// Reads a process's output as a worker's (a canary's gate).
    func registerOutput(_ output: WorkerOutput) { outputs[output.descriptor.fd] = output }

    /// Before the first worker: become the reaper of workers' orphans, and make the workers'
    /// cgroup folder where cgroup v2 allows it.
    func prepareWorkers() {
        do {
            try Syscall.becomeChildSubreaper()
        } catch {
            logger.warning("cannot become the reaper of workers' orphans: \(error)")
        }
        cgroups = WorkerCgroups.make(logger: logger)
        // After an exec in place the folder is this pid's already and holds the adopted workers'
        // cgroups: new ones are numbered after them.
        workerStarts = cgroups?.lastSequence ?? 0
    }

    /// Starts a worker on every slot that has none (adopted workers keep theirs).
    func startWorkers(of service: ServiceRuntime) {
        for slot in service.slots where slot.pid == nil { startWorker(service, slot, now: MonotonicClock.nanoseconds()) }
    }

    func startAllWorkers() {
        for service in services {
            let workersAfter = adoptWorkers(of: service)
            adoptLeaving(of: service)
            resumeCanary(of: service)
            startWorkers(of: service)
            if let count = workersAfter {
                if service.plane.maps.holdsSlots(forWorkers: count) {
                    service.logger.notice("the configuration says \(count) workers, the maps taken over \(service.slots.count): scaling")
                    do {
                        _ = try scaleReportingStarts(service, to: count)
                    } catch {
                        service.logger.error("cannot scale to the configured \(count) workers: \(error)")
                    }
                } else {
                    rebuild(service, workers: count)
                }
            }
        }
        // Pipes of workers that were not adopted (they exited during the exec).
        for pipe in inheritedOutputs.values { pipe.close() }
        inheritedOutputs.removeAll()
        nextStallCheck = MonotonicClock.nanoseconds() + Supervisor.stallCheckIntervalNs
        if hasStallCheck { sockDiag = try? SocketDiagnostics.openSocket() }
    }

    func service(named name: String) -> ServiceRuntime? { services.first { $0.name == name } }

    /// The configuration asks for more workers than the maps taken over have slots for (they
    /// were sized for fewer: SlotCapacity): the service is built again beside them with maps
    /// of the size asked for, carrying the placement and the live flows over (as a reload that
    /// raises `workers` does), then scaled to `workers`. If that fails, the adopted service
    /// serves on at its size, and the log says why.
    func rebuild(_ service: ServiceRuntime, workers: Int) {
        service.logger.notice(
            "the configuration says \(workers) workers, the maps taken over have room for fewer (\(service.plane.maps.slotCapacity) slots): building the service again beside them")
        var wanted = service.configuration
        wanted.workers = workers
        do {
            let new = try stageService(wanted, ownGroups: Set(services.flatMap(\.listeners)), predecessor: service)
            try replace(service, with: new)
            if new.slots.count != workers { _ = try scaleReportingStarts(new, to: workers) }
        } catch {
            service.logger.error("cannot grow the maps for the configured \(workers) workers: \(error); serving on with \(service.slots.count) (a reload tries again)")
        }
    }

    /// Stops a service's workers (in the background) and closes its sockets and pins now.
    func stopService(_ service: ServiceRuntime, now: Int64) {
        for (pid, drain) in table.draining where drain.service === service { endDrain(pid, now: now, counting: false) }
        for slot in service.slots {
            if let pid = slot.pid { stopWorker(pid, now: now) }
            slot.pid = nil
            slot.nextStartAt = nil
        }
        socketStore?.remove(service)
        service.close()
        service.logger.notice("service \(service.name) stopped")
    }

    /// Closes every service's sockets and removes its pins (after reading what the workers'
    /// pipes still hold, with `drainingOutput`). Workers must be gone; the pins of the services
    /// named in `keepingPins` stay (a worker of theirs still runs: a later daemon adopts it).
    func closeServices(drainingOutput: Bool = false, keepingPins: Set<String> = []) {
        if drainingOutput { for output in outputs.values { output.drain() } }
        for service in services { service.close(keepingPins: keepingPins.contains(service.name)) }
        services.removeAll()
        cgroups?.remove()
        sockDiag?.close()
        sockDiag = nil
    }

    // MARK: workers

    /// Returns why the worker could not start (it is then retried after the back-off), nil when it did.
    @discardableResult
    func startWorker(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64) -> Error? {
        var logger = service.logger
        logger[metadataKey: "slot"] = "\(slot.index)"
        slot.nextStartAt = nil
        var cgroup: String?
        do {
            workerStarts += 1
            cgroup = try cgroups?.make(service: service.name, slot: slot.index, sequence: workerStarts)
            // The write end closes when this scope ends: the worker holds the only copy.
            let (output, writeEnd) = try WorkerOutput.pipe(logger: logger, drops: drops(of: service, slot))
            let pid = try withExtendedLifetime(writeEnd) {
                try spawnWorker(service, slot, cgroup: cgroup, output: writeEnd.fd)
            }
            output.logger[metadataKey: "pid"] = "\(pid)"
            output.pid = pid
            outputs[output.descriptor.fd] = output
            let started = WorkerProcesses(leader: pid, cgroup: cgroup, origin: WorkerOrigin(
                service: service.name, slot: slot.index, generation: slot.generation, startTime: 0))
            if slot.everStarted { slot.restarts &+= 1 }
            slot.everStarted = true
            slot.pid = pid
            // Our child, not yet reaped: the pid cannot have been reused.
            slot.startTime = (try? Syscall.processStartTime(pid)) ?? 0
            started.origin.startTime = slot.startTime
            table.serve(pid, processes: started, service: service, slot: slot)
            slot.lifecycle.started(now: now, watchdogMs: service.configuration.watchdogMs)
            slot.notifiedReady = false
            slot.notifiedStatus = nil
            slot.readySinceNs = nil
            service.setWorkerState(slot, to: service.isFailedOver(slot) ? .failedOver : .starting)
            logger.info("worker started, pid \(pid)")
            return nil
        } catch {
            if let cgroup { _ = try? Syscall.removeDirectory(cgroup) }
            logger.error("cannot start a worker: \(error)")
            scheduleRestart(service, slot, now: now, livedNs: 0, status: nil)
            return error
        }
    }

    /// Why an exec of the daemon now would lose track of something, or nil when it may go ahead.
    /// Workers that left their slot are handed to the new image through the pins (rp_leaving):
    /// those stopping are stopped again, those holding their TCP connections keep them until
    /// their hold ends. Only a drain of queued datagrams waits (at most `stop_timeout_ms`): its
    /// socket copies, with which it sees the queue empty, live only in this image.
    var reexecRefusal: String? {
        if stopping { return "the daemon is stopping" }
        let busy = table.draining.filter { !$0.drain.listenersReleased }.count
        guard busy == 0 else {
            return "\(busy) workers are draining what was queued at their removed slots (at most stop_timeout_ms, \(configuration.stopTimeoutMs) ms): ask again once they are done"
        }
        return nil
    }

    /// Takes over what a previous daemon's rows name (WorkerAdoption): adopted workers run on
    /// their slots, supervised through their pidfds; workers that are the slot's but whose
    /// sockets could not be taken over are stopped; processes that are not the slot's worker are
    /// left alone. Returns the configured worker count to scale to, if it differs.
    func adoptWorkers(of service: ServiceRuntime) -> Int? {
        guard let (adoption, workersAfter) = service.takeAdoption() else { return nil }
        let now = MonotonicClock.nanoseconds()
        for worker in adoption.adopted {
            guard let slot = service.slot(worker.slot) else {
                stopAdopted(service, worker.slot, worker.pid, worker.pidfd, now: now, reason: "its slot is not in the maps")
                continue
            }
            table.serve(worker.pid, processes: WorkerProcesses(
                leader: worker.pid, cgroup: WorkerCgroups.cgroup(of: worker.pid),
                origin: WorkerOrigin(service: service.name, slot: slot.index, generation: slot.generation,
                                     startTime: worker.startTime)), pidfd: worker.pidfd, service: service, slot: slot)
            slot.pid = worker.pid
            slot.startTime = worker.startTime
            slot.lifecycle.started(now: now, watchdogMs: service.configuration.watchdogMs)
            slot.everStarted = true
            slot.restarts = worker.row.restarts
            slot.stalls = worker.row.stalls
            slot.watchdogRestarts = worker.row.watchdog_restarts
            // Adopted running: ready now.
            slot.lifecycle.ready(now: now, rescue: &service.rescue)
            service.adoptedWorkers += 1
            service.setWorkerState(slot, to: service.isFailedOver(slot) ? .failedOver : .running)
            if let pipe = inheritedOutputs.removeValue(forKey: worker.pid) {
                var logger = service.logger
                logger[metadataKey: "slot"] = "\(slot.index)"
                logger[metadataKey: "pid"] = "\(worker.pid)"
                if let output = try? WorkerOutput.inherited(pipe, logger: logger, drops: drops(of: service, slot)) {
                    output.pid = worker.pid
                    outputs[output.descriptor.fd] = output
                }
            }
            let cookies = worker.sockets.compactMap { try? $0.cookie() }.map(String.init).joined(separator: ", ")
            service.logger.notice("slot \(slot.index): adopted worker pid \(worker.pid) with its socket (cookie \(cookies))")
        }
        for worker in adoption.unusable {
            stopAdopted(service, worker.slot, worker.pid, worker.pidfd, now: now, reason: worker.reason)
        }
        for (slot, pid, reason) in adoption.refused {
            service.refusedAdoptions += 1
            service.logger.warning("slot \(slot): not adopting pid \(pid), and not signalling it: \(reason)")
        }
        lastEvent = "\(service.name): \(adoption.adopted.count) workers adopted"
        return workersAfter
    }

    /// Stops a previous daemon's worker that cannot serve this data plane (SIGTERM through its
    /// pidfd, SIGKILL at the stop timeout), watching its pidfd until it is gone.
    private func stopAdopted(_ service: ServiceRuntime, _ slot: UInt32, _ pid: pid_t, _ pidfd: OwnedDescriptor,
                             now: Int64, reason: String) {
        service.logger.warning("slot \(slot): the previous daemon's worker pid \(pid) cannot be adopted (\(reason)): stopping it")
        stopThroughPidfd(pid, pidfd, now: now, origin: WorkerOrigin(service: service.name, slot: slot, generation: 0,
                                                                  startTime: (try? Syscall.processStartTime(pid)) ?? 0))
    }

    /// SIGTERM through the pidfd, SIGKILL (to its process group) at the stop timeout; the pidfd
    /// is polled, so its exit is seen although it is not this process's child.
    private func stopThroughPidfd(_ pid: pid_t, _ pidfd: OwnedDescriptor, now: Int64, origin: WorkerOrigin) {
        table.track(pid, processes: WorkerProcesses(leader: pid, cgroup: nil, origin: origin), pidfd: pidfd)
        table.stop(pid, killAt: now + configuration.stopTimeoutMs.msAsNs)
        try? Syscall.pidfdSignal(pidfd, SIGTERM)
    }

    /// Tracks a previous daemon's process, proven by `pidfd`, until it has exited.
    func track(adopted started: WorkerProcesses, pidfd: OwnedDescriptor) {
        table.track(started.leader, processes: started, pidfd: pidfd)
    }

    /// An adopted worker's pidfd became readable: it exited. Its status is known only if it is
    /// this process's child (a worker of the image before an exec).
    func adoptedExited(_ fd: FileDescriptor) {
        guard let pid = table.pid(ofPidfd: fd) else { return }
        table.closePidfd(of: pid)
        let status = (try? Syscall.wait(pid, block: false))?.status
        processExited(pid, status: status, now: MonotonicClock.nanoseconds())
        forgetFinishedWorkers()
    }

    /// Starts a worker's process inside its cgroup where the kernel can (clone3 with
    /// CLONE_INTO_CGROUP, 5.7), else with `--cgroup` for `exec-worker` to join it. The first
    /// start with a cgroup finds out which, and says so once.
    private func spawnWorker(_ service: ServiceRuntime, _ slot: SlotRecord, cgroup: String?,
                             output: FileDescriptor) throws -> pid_t
    {
        func spawn(inside folder: OwnedDescriptor?) throws -> pid_t {
            try WorkerSpawn(executable: executable,
                            arguments: workerArguments(service.configuration(of: slot),
                                                       cgroup: folder == nil ? cgroup : nil),
                            environment: workerEnvironment(service, slot),
                            sockets: service.plane.sockets(ofSlot: slot.index).map(\.fd),
                            output: output, cgroup: folder?.fd).start()
        }
        guard let cgroup, cgroups?.createsInside != false else { return try spawn(inside: nil) }
        // O_RDONLY: Swift cannot import O_PATH (_GNU_SOURCE); clone3 takes either.
        let folder = try Syscall.open(cgroup, O_RDONLY | O_DIRECTORY)
        do {
            let pid = try withExtendedLifetime(folder) { try spawn(inside: folder) }
            if cgroups?.createsInside == nil {
                cgroups?.createsInside = true
                logger.info("workers are created inside their cgroup (clone3 CLONE_INTO_CGROUP)")
            }
            return pid
        } catch where cgroups?.createsInside == nil && ProcessSpawn.cgroupSpawnUnsupported(error) {
            cgroups?.createsInside = false
            logger.notice("workers join their cgroup themselves, writing cgroup.procs (slower): \(error)")
            return try spawn(inside: nil)
        }
    }

    /// The drop counts of a slot's workers' output.
    func drops(of service: ServiceRuntime, _ slot: SlotRecord) -> OutputDrops {
        if let drops = outputDrops[service.name]?[slot.index] { return drops }
        let drops = OutputDrops()
        outputDrops[service.name, default: [:]][slot.index] = drops
        return drops
    }

    /// `cgroup`: the folder `exec-worker` joins (only when the process was not created in it).
    func workerArguments(_ service: ServiceConfiguration, cgroup: String? = nil) -> [String] {
        var arguments = ["reuseportd", "exec-worker", "--parent", String(getpid())]
        if let cgroup { arguments += ["--cgroup", cgroup] }
        if let user = service.user { arguments += ["--user", user] }
        if let group = service.group { arguments += ["--group", group] }
        switch service.program {
        case .builtin(let kind): arguments += ["--builtin", kind.rawValue]
        case .exec(let argv): arguments += ["--"] + argv
        }
        return arguments
    }

    func workerEnvironment(_ service: ServiceRuntime, _ slot: SlotRecord) -> [String] {
        WorkerEnvironment.make(service.configuration(of: slot), listeners: service.plane.listeners.count,
                               slot: slot.index, generation: slot.generation, notifySocket: notify?.path)
    }

    /// Reads one chunk of a worker's pipe; forgets it at end of file.
    func readOutput(_ fd: FileDescriptor, now: Int64) {
        if let output = outputs[fd], !output.readChunk(now: now) { outputs.removeValue(forKey: fd) }
    }

    /// The pipes to poll now: not those that have read their share of this second.
    func polledOutputs(now: Int64) -> [FileDescriptor] {
        outputs.filter { $0.value.pausedUntil(now: now) == nil }.map(\.key)
    }

    /// When the first paused pipe is polled again.
    func nextOutputResume(now: Int64) -> Int64? {
        outputs.values.compactMap { $0.pausedUntil(now: now) }.min()
    }

    func reapWorkers() {
        let now = MonotonicClock.nanoseconds()
        // Every child, including orphans of workers re-parented to the daemon (their pids are
        // not workers': they are reaped and otherwise ignored).
        while let (pid, status) = try? Syscall.wait(block: false) {
            // An adopted child (after an exec) is reaped here; its pidfd is no longer needed.
            table.closePidfd(of: pid)
            processExited(pid, status: status, now: now)
        }
        forgetFinishedWorkers()
    }

    /// A worker's process ended (`status`: nil when it was not this process's child, an adopted
    /// worker of a previous daemon): stop what it left behind, end its drain, or restart its slot.
    private func processExited(_ pid: pid_t, status: WaitStatus?, now: Int64) {
        if gateExited(pid, status: status) { return }
        guard let exited = table.processes(of: pid) else { return }
        exited.leaderDidExit()
        if table.killAt(pid) == nil, !exited.isEmpty {
            // They hold the slot's socket and would read beside the replacement: stop them.
            let stopMs = configuration.stopTimeoutMs
            logger.warning("worker pid \(pid) left processes behind: SIGTERM to them, SIGKILL after \(stopMs) ms")
            exited.signalAll(SIGTERM)
            table.stop(pid, killAt: now + stopMs.msAsNs)
        }
        let sentence = status?.sentence ?? "exited (an adopted worker: its status is its old parent's)"
        // An adopted worker's status is unknown: count it as a signal death (restart at once
        // after a healthy run, as for any worker killed from outside).
        let status = status ?? .killed(signal: SIGKILL)
        if table.drain(of: pid) != nil {
            endDrain(pid, now: now, counting: true, reason: "its worker \(sentence)", exited: true)
            return
        }
        guard let (service, slot) = table.leaveSlot(pid) else { return }
        let lived = slot.lifecycle.workerExited(now: now)
        slot.pid = nil
        var logger = service.logger
        logger[metadataKey: "slot"] = "\(slot.index)"
        logger.warning("worker pid \(pid) \(sentence) after \(lived / 1_000_000) ms")
        noteExit(service, slot, status: status, livedNs: lived)
        lastEvent = "\(service.name) slot \(slot.index): worker pid \(pid) \(sentence)"
        if upgradeWorkerExited(service, slot, pid: pid, status: status, livedNs: lived, now: now) { return }
        scheduleRestart(service, slot, now: now, livedNs: lived, status: status)
        checkCrashLoop(service, slot)
    }

    /// Drops every worker start whose worker has exited and whose processes are all gone.
    func forgetFinishedWorkers() {
        for drain in table.forgetFinished() { releaseSockets(drain) }
    }

    /// After an exit (`status`; nil: the worker could not be spawned): carries out what
    /// `SlotLifecycle.afterExit` decides (the back-off, the quick exits, the rescue start).
    func scheduleRestart(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64, livedNs: Int64,
                         status: WaitStatus?) {
        var random = SystemRandomNumberGenerator()
        let decision = slot.lifecycle.afterExit(
            livedNs: livedNs, status: status, now: now, policy: service.configuration.restart,
            onTrial: isOnTrial(service, slot), stopping: stopping,
            anotherSlotHasWorker: service.slots.contains { $0 !== slot && $0.pid != nil },
            rescue: &service.rescue, random: &random)
        switch decision {
        case .none:
            return
        case .startNow(let rescue):
            if let rescue {
                service.logger.warning(
                    "slot \(slot.index): every other slot is down, starting at once instead of in \(rescue.insteadOfMs) ms (rescue \(rescue.count))")
            }
            startWorker(service, slot, now: now)
        case .startAt(_, let delay):
            service.setWorkerState(slot, to: service.isFailedOver(slot) ? .failedOver : .backoff)
            service.logger.info("slot \(slot.index): next start in \(delay) ms")
        }
    }

    /// Sends SIGTERM to every process of a worker; SIGKILL follows at the stop timeout.
    func stopWorker(_ pid: pid_t, now: Int64) {
        table.leaveSlot(pid)
        table.stop(pid, killAt: now + configuration.stopTimeoutMs.msAsNs)
        signal(pid, SIGTERM)
    }

    /// Sends `signal` to every process of the worker `pid`.
    func signal(_ pid: pid_t, _ signal: Int32) {
        if let tracked = table.processes(of: pid) {
            tracked.signalAll(signal)
        } else {
            // The worker leads its own process group: its children go too.
            try? Syscall.kill(-pid, signal)
        }
    }

    /// Starts a new worker on the slot at once and stops the old one: for a moment both
    /// read the same socket, so no datagram waits for the restart.
    /// Returns why the new worker could not start, nil when it did.
    @discardableResult
    func restart(_ service: ServiceRuntime, _ slot: SlotRecord) -> Error? {
        let now = MonotonicClock.nanoseconds()
        if let pid = slot.pid { stopWorker(pid, now: now) }
        slot.pid = nil
        slot.quickExits = 0
        return startWorker(service, slot, now: now)
    }

    /// Returns the buckets that move at the switch.
    func scale(_ service: ServiceRuntime, to count: Int) throws -> Int {
        try scaleReportingStarts(service, to: count).plan.movingBuckets
    }

    /// Scales as a change (ServiceRuntime.beginResize): with flow tracking, the buckets that move
    /// learn their live flows for one idle timeout and switch then, and slots that leave retire
    /// once drained; `immediately` switches now and retires the leaving slots at once. Returns the
    /// plan and the added slots whose worker could not start, with why (they are retried after
    /// the back-off).
    func scaleReportingStarts(_ service: ServiceRuntime, to count: Int, immediately: Bool = false) throws
        -> (plan: TransitionPlan, failures: [(slot: UInt32, error: Error)])
    {
        let before = service.plane.slots.count
        let now = MonotonicClock.nanoseconds()
        let (plan, added) = try service.beginResize(to: count, now: now, immediately: immediately)
        socketStore?.store(service, slots: added.map(\.index))
        var failures: [(slot: UInt32, error: Error)] = []
        for slot in added {
            if let error = startWorker(service, slot, now: now) { failures.append((slot.index, error)) }
        }
        service.nextTransitionCheck = now
        let buckets = service.configuration.bucketCount
        if service.plane.pending != nil {
            let learnMs = (plan.switchNs - now) / 1_000_000
            service.logger.notice(
                "workers \(before) → \(count): \(plan.movingBuckets) of \(buckets) buckets learn their live flows for \(learnMs) ms, then switch\(leavingSentence(plan))")
        } else {
            service.logger.notice("workers \(before) → \(count): \(plan.movingBuckets) of \(buckets) buckets moved at once\(leavingSentence(plan))")
        }
        checkTransition(service, now: now)
        return (plan, failures)
    }

    private func leavingSentence(_ plan: TransitionPlan) -> String {
        guard !plan.leaving.isEmpty else { return "" }
        let list = plan.leaving.map(String.init).joined(separator: ", ")
        return "; slots \(list) leave once their \(plan.recordedFlowsOnLeaving) recorded flows are idle"
    }

    /// A change's check: switches when learning is over, sweeps the records (idle ones go, those
    /// of failed-over slots too), retires each leaving slot once no live record names it or the
    /// drain deadline passed (its worker drains its queue and is stopped: SlotDrain), and ends
    /// the change once nothing is pending, leaving or recorded.
    func checkTransition(_ service: ServiceRuntime, now: Int64) {
        let plane = service.plane
        do {
            if let moved = try plane.advance(now: now) {
                service.logger.notice("placement switched: \(moved) buckets moved; recorded flows keep their slot until idle")
                upgradeSwitched(service, moved: moved, now: now)
            }
            let sweep = try plane.sweep(now: now, forget: plane.failedOver)
            for slot in service.slots { slot.records = sweep.liveBySlot[slot.index] ?? 0 }
            let deadlinePassed = plane.drainDeadlineNs.map { now >= $0 } == true
            for slot in service.slots where plane.leaving.contains(slot.index) {
                // A rolled-back canary's slot takes new flows until the switch.
                guard slot.records == 0 || deadlinePassed, !plane.effectiveBuckets.contains(slot.index) else { continue }
                if slot.records > 0 {
                    service.logger.warning(
                        "slot \(slot.index) retires at the drain timeout with \(slot.records) live recorded flows: they move")
                    service.flowsMovedAtDeadline += slot.records
                }
                retireLeaving(service, slot, now: now)
            }
            if sweep.finished {
                service.logger.notice("placement change finished")
                service.nextTransitionCheck = nil
            } else {
                service.nextTransitionCheck = now + service.sweepIntervalNs
            }
            for slot in service.slots { service.publish(slot) }
        } catch {
            service.logger.error("placement change: \(error); retried in \(service.sweepIntervalNs / 1_000_000) ms")
            service.nextTransitionCheck = now + service.sweepIntervalNs
        }
    }

    /// Retires a leaving slot: its sockets leave the arrays, its worker reads what is queued
    /// there and is stopped (SlotDrain).
    func retireLeaving(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64) {
        let sockets: [ReuseportSocket]
        do {
            sockets = try service.retire(slot, now: now)
        } catch {
            service.logger.error("cannot retire slot \(slot.index): \(error)")
            return
        }
        socketStore?.remove(service: service.name, listeners: service.listeners.count, slots: [slot.index])
        let drain = SlotDrain(service: service, slot: slot.index, sockets: sockets,
                              deadline: now + configuration.stopTimeoutMs.msAsNs, now: now)
        drain.holdWorkerUntil = connectionHold(service, slot, now: now)
        if let pid = slot.pid {
            table.leaveSlot(pid)
            table.startDrain(pid, drain)
            // An upgrade's old workers got it at the switch; a scale-down's get it as they leave:
            // a server that takes it finishes its connections and exits by itself.
            if drain.holdWorkerUntil != nil, slot.generation == service.plane.workingGeneration,
               let drainSignal = service.configuration.drainSignal {
                signal(pid, drainSignal)
            }
        } else {
            finish(drain, reason: "it had no worker")
            releaseSockets(drain)
        }
        service.clear(slot)
        service.pruneDefinitions()
        service.logger.info("slot \(slot.index) retired")
    }

    /// How long a retiring slot's worker keeps the TCP connections it accepted (a connection is
    /// a live flow that cannot move: stopping its worker would close it): until it exits by
    /// itself, or `drain_timeout_ms` after the switch that made it leave (an upgrade's), or after
    /// it retires (a scale-down's); nil for a service without TCP listeners, whose worker is
    /// stopped once drained.
    func connectionHold(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64) -> Int64? {
        guard service.listeners.contains(where: { $0.transport == .tcp }) else { return nil }
        let limitMs = service.configuration.tracking.drainTimeoutMs
        guard limitMs > 0 else { return Int64.max }
        let since = slot.generation != service.plane.workingGeneration ? (service.upgrade?.switchedAt ?? now) : now
        return since + limitMs.msAsNs
    }

    // MARK: stop

    func beginStop(reason: String) {
        logger.notice("\(reason): stopping \(table.servingCount) workers (SIGKILL after \(configuration.stopTimeoutMs) ms)")
        stopping = true
        closeHealthProbes()
        let now = MonotonicClock.nanoseconds()
        for pid in table.drainingPids { endDrain(pid, now: now, counting: false) }
        for worker in table.serving {
            worker.slot.pid = nil
            worker.slot.nextStartAt = nil
            worker.service.setWorkerState(worker.slot, to: .stopping)
            stopWorker(worker.pid, now: now)
        }
        for service in services {
            for slot in service.slots where slot.state != .stopping {
                slot.nextStartAt = nil
                service.setWorkerState(slot, to: .stopping)
            }
        }
        // A worker the pins name that this daemon does not supervise (one an adoption missed)
        // holds the service's sockets and port: stopped too, or the stop would leave it running.
        for stray in unsupervisedPinnedWorkers() {
            stray.service.logger.warning(
                "slot \(stray.slot): the pins name worker pid \(stray.pid), which this daemon does not supervise: stopping it")
            stopThroughPidfd(stray.pid, stray.pidfd, now: now, origin: WorkerOrigin(
                service: stray.service.name, slot: stray.slot, generation: 0,
                startTime: (try? Syscall.processStartTime(stray.pid)) ?? 0))
        }
    }

    /// Workers the pins name that this daemon does not supervise: a row's pid, alive with the
    /// start time the row recorded (a pidfd bound to it, as for an adoption), that is none of
    /// the workers this daemon tracks. Rows of supervised slots name their own workers, and a
    /// stopping slot's row names none.
    func unsupervisedPinnedWorkers() -> [(service: ServiceRuntime, slot: UInt32, pid: pid_t, pidfd: OwnedDescriptor)] {
        var found: [(service: ServiceRuntime, slot: UInt32, pid: pid_t, pidfd: OwnedDescriptor)] = []
        for service in services {
            let maps = service.plane.maps
            for slot in 0..<UInt32(ServiceDataPlane.pinnedSlotBound(maps)) {
                guard let row = try? maps.readSlotState(slot), row.pid != 0 else { continue }
                let pid = pid_t(row.pid)
                guard !table.contains(pid),
                      case .worker(let pidfd) = WorkerAdoption.identify(pid, startTime: row.start_time)
                else { continue }
                found.append((service, slot, pid, pidfd))
            }
        }
        return found
    }

    /// After the stop: the workers still running, named by the pins (with their service) or
    /// tracked (a worker start whose processes are not all gone; its service is not recorded).
    /// Empty once the stop did what it says.
    func survivingWorkers() -> [(service: String?, pid: pid_t)] {
        unsupervisedPinnedWorkers().map { ($0.service.name, $0.pid) }
            + table.entries.filter { !$0.value.processes.leaderExited || !$0.value.processes.isEmpty }.keys.sorted()
            .map { (nil, $0) }
    }

    /// A second stop signal: the stopping workers' SIGKILL deadlines are now.
    func killStoppingNow() {
        table.killStoppingNow()
    }

    /// When the daemon cannot go on: SIGKILL to every worker, reap them all, close every
    /// service. Nothing is left running.
    func killAllAndClose() {
        stopping = true
        for pid in table.pids { signal(pid, SIGKILL) }
        // Every child: the workers and the orphans of theirs the daemon reaps, until none is left.
        while (try? Syscall.wait(block: true)) != nil {}
        for drain in table.removeAll() { releaseSockets(drain) }
        closeServices(drainingOutput: true)
    }
}

extension WaitStatus {
    /// "exited with status 3", "was killed by signal 9": for the log.
    var sentence: String {
        switch self {
        case .exited(let code): return "exited with status \(code)"
        case .killed(let signal): return "was killed by signal \(signal)"
        }
    }
}

extension Int {
    /// Milliseconds as nanoseconds.
    var msAsNs: Int64 { Int64(self) * 1_000_000 }
}
