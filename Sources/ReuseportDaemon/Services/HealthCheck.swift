#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit
import ReuseportControl
import SystemPackage

/// One slot's record of its health checks: counters, and the decision a probe's outcome leads
/// to. Pure: the clock and the settings are arguments (tested in process, HealthCheckTests).
struct SlotHealth: Equatable {
    enum Outcome: Equatable {
        /// The slot's counter grew and the answer was healthy.
        case passed
        /// The slot's counter grew (the program sent the probe there), and no healthy answer came.
        case failed(String)
        /// The slot's counter did not grow: the probe went elsewhere (the tables changed under
        /// it) or was lost before the program. Says nothing about the worker.
        case unreached(String)
    }

    enum Action: Equatable {
        case none
        /// `failures` probes in a row failed: restart the worker at its slot (as a missed watchdog).
        case restart
        /// ... and the slot has been unhealthy, with no passed probe, for `failover_after_ms`: its
        /// buckets go to the other slots too (as a crash-looping slot's).
        case restartAndFailOver
    }

    var probes = 0
    var passed = 0
    var failed = 0
    var unreached = 0
    /// Probes not sent: no source port lands on the slot (it holds no bucket now).
    var unaddressable = 0
    var consecutiveFailures = 0
    var restarts = 0
    var failovers = 0
    /// Since the first restart with no passed probe after it (CLOCK_MONOTONIC).
    var unhealthySince: Int64?
    var lastProblem: String?
    /// The worker this record's failures in a row are about.
    var pid: pid_t?
    /// A worker that was restarted for its health: not probed again.
    var condemned: pid_t?

    var isHealthy: Bool { unhealthySince == nil && consecutiveFailures == 0 }

    /// Counts `outcome` of a probe of worker `pid` and says what to do.
    mutating func record(_ outcome: Outcome, pid: pid_t, now: Int64, settings: HealthCheckSettings,
                         failoverAfterMs: Int) -> Action {
        if self.pid != pid {
            self.pid = pid
            consecutiveFailures = 0
        }
        probes += 1
        switch outcome {
        case .passed:
            passed += 1
            consecutiveFailures = 0
            unhealthySince = nil
            return .none
        case .unreached(let why):
            unreached += 1
            lastProblem = why
            return .none
        case .failed(let why):
            failed += 1
            lastProblem = why
            consecutiveFailures += 1
            guard consecutiveFailures >= settings.failures else { return .none }
            consecutiveFailures = 0
            restarts += 1
            condemned = pid
            let since = unhealthySince ?? now
            unhealthySince = since
            if now - since >= failoverAfterMs.msAsNs {
                failovers += 1
                return .restartAndFailOver
            }
            return .restart
        }
    }
}

/// A probe on its way: its own socket, bound to a source port whose flow lands on the slot.
final class HealthProbe {
    let service: ServiceRuntime
    let slot: UInt32
    let pid: pid_t
    let socket: OwnedDescriptor
    let transport: Transport
    let source: SocketAddress
    let destination: SocketAddress
    let deadline: Int64
    /// rp_slot_stats' packets of the slot before the probe left.
    let packetsBefore: UInt64
    /// TCP: the payload is not sent yet (the connect is in progress).
    var connecting: Bool
    var reply: [UInt8] = []

    init(service: ServiceRuntime, slot: UInt32, pid: pid_t, socket: OwnedDescriptor, transport: Transport,
         source: SocketAddress, destination: SocketAddress, deadline: Int64, packetsBefore: UInt64, connecting: Bool) {
        self.service = service
        self.slot = slot
        self.pid = pid
        self.socket = socket
        self.transport = transport
        self.source = source
        self.destination = destination
        self.deadline = deadline
        self.packetsBefore = packetsBefore
        self.connecting = connecting
    }
}

/// The health checks' state, held by the supervisor: every slot's record, when each is probed
/// next, and the probes in flight (at most one per slot).
final class HealthChecks {
    /// By service name, then slot.
    var records: [String: [UInt32: SlotHealth]] = [:]
    var nextProbe: [String: [UInt32: Int64]] = [:]
    var inFlight: [FileDescriptor: HealthProbe] = [:]
    /// Services whose listener no local source reaches (said once, at start).
    var unreachable: Set<String> = []
    /// How soon a TCP probe whose connect is in progress is looked at again.
    static let connectRecheckNs: Int64 = 1_000_000

    func record(_ service: String, _ slot: UInt32) -> SlotHealth? { records[service]?[slot] }
}

extension Supervisor {
    /// The slots a health check probes now: a worker that is running (or stalled), holding
    /// buckets (not failed over, not leaving), and not already condemned.
    func probedSlots(_ service: ServiceRuntime) -> [SlotRecord] {
        service.slots.filter { slot in
            guard let pid = slot.pid, slot.state == .running || slot.state == .stalled else { return false }
            return !service.plane.leaving.contains(slot.index) && !service.plane.failedOver.contains(slot.index)
                && healthChecks.record(service.name, slot.index)?.condemned != pid
        }
    }

    /// When the health checks need the loop next: a probe to send, a TCP connect to look at,
    /// or a probe's timeout; a probed slot not yet scheduled needs it now.
    var nextHealthCheck: Int64? {
        guard !stopping else { return nil }
        var times = healthChecks.inFlight.values.map {
            $0.connecting ? min($0.deadline, MonotonicClock.nanoseconds() + HealthChecks.connectRecheckNs) : $0.deadline
        }
        for service in services where service.configuration.healthCheck != nil
            && !healthChecks.unreachable.contains(service.name)
        {
            for slot in probedSlots(service) {
                times.append(healthChecks.nextProbe[service.name]?[slot.index] ?? 0)
            }
        }
        return times.min()
    }

    /// The descriptors the loop polls for answers.
    var healthProbeDescriptors: [FileDescriptor] { healthChecks.inFlight.filter { !$0.value.connecting }.map(\.key) }

    /// Sends the probes that are due, finishes those past their timeout, sends a TCP probe's
    /// payload once its connection is up.
    func runHealthChecks(now: Int64) {
        for (fd, probe) in healthChecks.inFlight {
            if now >= probe.deadline {
                finishProbe(fd, now: now, timedOut: true)
            } else if probe.connecting {
                sendOnceConnected(fd, probe, now: now)
            }
        }
        for service in services {
            guard let settings = service.configuration.healthCheck else { continue }
            let busy = Set(healthChecks.inFlight.values.filter { $0.service === service }.map(\.slot))
            let interval = settings.effectiveIntervalMs(slots: service.slots.count).msAsNs
            let probed = probedSlots(service)
            // A slot that stopped being probed is scheduled afresh (an interval after it is again).
            let indices = Set(probed.map(\.index))
            healthChecks.nextProbe[service.name] = healthChecks.nextProbe[service.name]?.filter { indices.contains($0.key) }
            for (position, slot) in probed.enumerated() where !busy.contains(slot.index) {
                guard let due = healthChecks.nextProbe[service.name]?[slot.index] else {
                    // Spread over the interval: the service's probes do not leave in one burst.
                    let offset = interval * Int64(position) / Int64(max(probed.count, 1))
                    healthChecks.nextProbe[service.name, default: [:]][slot.index] = now + interval + offset
                    continue
                }
                guard now >= due else { continue }
                healthChecks.nextProbe[service.name]?[slot.index] = now + interval
                sendProbe(service, slot, settings: settings, now: now)
            }
        }
    }

    /// Where `service`'s probes go and come from; nil (said once) when no local source reaches
    /// the listener.
    func probeRoute(_ service: ServiceRuntime, _ settings: HealthCheckSettings) -> (from: IPAddress, to: SocketAddress)? {
        guard let listener = service.listeners.first(where: { $0.transport == settings.transport }) else { return nil }
        let route = ProbeAddressing.route(to: listener.address) { Supervisor.isLocalAddress($0) }
        if route == nil, !healthChecks.unreachable.contains(service.name) {
            healthChecks.unreachable.insert(service.name)
            service.logger.error(
                "health check: no source on this host reaches \(listener) (not one of its addresses): the service's workers are not probed")
        }
        return route
    }

    /// Whether `address` is one of this host's: a socket binds to it.
    static func isLocalAddress(_ address: IPAddress) -> Bool {
        guard let socket = try? Syscall.socket(address.family, Int32(SOCK_DGRAM.rawValue), "health check") else {
            return false
        }
        defer { socket.close() }
        return (try? Syscall.bind(socket.fd, SocketAddress(address, 0), "health check")) != nil
    }

    /// Said at start: the services whose health checks cannot reach their listener.
    func checkHealthCheckRoutes() {
        for service in services {
            guard let settings = service.configuration.healthCheck, let route = probeRoute(service, settings) else {
                continue
            }
            service.logger.notice(
                "health check: \(settings.transport) probes from \(route.from) to \(route.to), every \(settings.effectiveIntervalMs(slots: service.slots.count)) ms per slot, unhealthy after \(settings.failures) failures (found within \(settings.detectionBoundMs(slots: service.slots.count)) ms)")
        }
    }

    private func sendProbe(_ service: ServiceRuntime, _ slot: SlotRecord, settings: HealthCheckSettings, now: Int64) {
        guard let pid = slot.pid, let route = probeRoute(service, settings) else { return }
        var health = healthChecks.record(service.name, slot.index) ?? SlotHealth()
        defer { healthChecks.records[service.name, default: [:]][slot.index] = health }
        let plane = service.plane
        let model = plane.model
        guard let seed = try? plane.maps.readConfig().seed else { return }
        var snapshot = SteeringSnapshot(seed: seed, slotCount: UInt32(model.slots.count), buckets: model.bucketValues,
                                        fallback: model.fallback, liveCount: UInt32(model.fallbackSlots.count),
                                        liveSlots: Set(model.liveSlots))
        snapshot.quic = plane.options.quic
        var socket: OwnedDescriptor?
        let port = ProbeAddressing.sourcePort(
            reaching: slot.index, transport: settings.transport, from: route.from, to: route.to,
            payload: settings.payload, in: snapshot, ports: ProbeAddressing.candidatePorts(for: slot.index),
            recordSlot: { (try? FlowRecords.record(of: $0, in: plane.maps))?.slot }
        ) { port in
            socket = try? Self.probeSocket(settings.transport, bound: SocketAddress(route.from, port))
            return socket != nil
        }
        guard let port, let socket else {
            health.unaddressable += 1
            health.lastProblem = "no source port lands on the slot"
            return
        }
        let packetsBefore = (try? plane.maps.slotCounters(slot.index).packets) ?? 0
        let probe = HealthProbe(service: service, slot: slot.index, pid: pid, socket: socket,
                                transport: settings.transport, source: SocketAddress(route.from, port),
                                destination: route.to, deadline: now + settings.timeoutMs.msAsNs,
                                packetsBefore: packetsBefore, connecting: settings.transport == .tcp)
        healthChecks.inFlight[socket.fd] = probe
        do {
            if settings.transport == .udp {
                try settings.payload.withUnsafeBytes { _ = try Syscall.send(socket.fd, $0, to: route.to) }
            } else {
                do {
                    try Syscall.connect(socket.fd, route.to, "health check")
                } catch let error as ReuseportError where error.errno == EINPROGRESS {
                    return
                }
                sendOnceConnected(socket.fd, probe, now: now)
            }
        } catch {
            finishProbe(socket.fd, now: now, error: "\(error)")
        }
    }

    /// A probe's socket: non-blocking, bound to `source`; a TCP one resets at its close (no
    /// TIME_WAIT left behind to keep the port from the next probe).
    static func probeSocket(_ transport: Transport, bound source: SocketAddress) throws -> OwnedDescriptor {
        let socket = try Syscall.socket(source.address.family, transport.socketType, nonBlocking: true, "health check")
        do {
            try Syscall.setOption(socket.fd, SOL_SOCKET, SO_REUSEADDR, Int32(1), "SO_REUSEADDR")
            if transport == .tcp {
                try Syscall.setOption(socket.fd, SOL_SOCKET, SO_LINGER, linger(l_onoff: 1, l_linger: 0), "SO_LINGER")
            }
            try Syscall.bind(socket.fd, source, "health check from \(source)")
        } catch {
            socket.close()
            throw error
        }
        return socket
    }

    private func sendOnceConnected(_ fd: FileDescriptor, _ probe: HealthProbe, now: Int64) {
        do {
            guard try Syscall.waitWritable(fd, timeoutMs: 0) else { return }
            var code: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            if getsockopt(fd.rawValue, SOL_SOCKET, SO_ERROR, &code, &length) == 0, code != 0 {
                throw ReuseportError.system("connect(health check to \(probe.destination))", code)
            }
            probe.connecting = false
            let payload = probe.service.configuration.healthCheck?.payload ?? []
            if !payload.isEmpty {
                _ = try payload.withUnsafeBytes { try Syscall.writeNow(fd, $0) }
            }
        } catch {
            finishProbe(fd, now: now, error: "\(error)")
        }
    }

    /// An answer (or the end of a TCP connection) arrived at a probe's socket.
    func probeReadable(_ fd: FileDescriptor, now: Int64) {
        guard let probe = healthChecks.inFlight[fd], let settings = probe.service.configuration.healthCheck else {
            return
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        do {
            guard let count = try Syscall.receive(fd, into: &buffer, flags: Int32(MSG_DONTWAIT)) else { return }
            probe.reply += buffer.prefix(count)
            // A TCP answer may come in pieces: wait for enough to judge, or for the end.
            if probe.transport == .tcp, count > 0, !settings.accepts(probe.reply),
               probe.reply.count < max(settings.expectPrefix.count, 1) || settings.expectRegex != nil {
                return
            }
            finishProbe(fd, now: now)
        } catch {
            finishProbe(fd, now: now, error: "\(error)")
        }
    }

    /// Judges a probe: did the program send it to the slot (its counter grew), and was the
    /// answer healthy? Then acts on the slot's record.
    private func finishProbe(_ fd: FileDescriptor, now: Int64, timedOut: Bool = false, error: String? = nil) {
        guard let probe = healthChecks.inFlight.removeValue(forKey: fd) else { return }
        probe.socket.close()
        let service = probe.service
        guard let settings = service.configuration.healthCheck, services.contains(where: { $0 === service }) else {
            return
        }
        let packetsAfter = (try? service.plane.maps.slotCounters(probe.slot).packets) ?? probe.packetsBefore
        let reached = packetsAfter > probe.packetsBefore
        let outcome: SlotHealth.Outcome
        if !reached {
            outcome = .unreached("probe from \(probe.source) did not reach slot \(probe.slot) (its counter did not grow)")
        } else if let error {
            outcome = .failed(error)
        } else if timedOut {
            outcome = .failed("no answer within \(settings.timeoutMs) ms")
        } else if settings.accepts(probe.reply) {
            outcome = .passed
        } else {
            outcome = .failed("unexpected answer of \(probe.reply.count) bytes: \(Self.printable(probe.reply))")
        }
        var health = healthChecks.record(service.name, probe.slot) ?? SlotHealth()
        let action = health.record(outcome, pid: probe.pid, now: now, settings: settings,
                                   failoverAfterMs: service.configuration.failoverAfterMs)
        healthChecks.records[service.name, default: [:]][probe.slot] = health
        switch outcome {
        case .failed(let why):
            service.logger.warning(
                "slot \(probe.slot): health check of worker pid \(probe.pid) failed (\(health.consecutiveFailures == 0 ? settings.failures : health.consecutiveFailures) of \(settings.failures)): \(why)")
        case .unreached(let why):
            service.logger.info("slot \(probe.slot): health check not counted: \(why)")
        case .passed:
            break
        }
        guard action != .none, let slot = service.slots.first(where: { $0.index == probe.slot }),
              slot.pid == probe.pid
        else { return }
        restartUnhealthy(service, slot, failures: settings.failures, now: now)
        if action == .restartAndFailOver, !service.isFailedOver(slot) {
            service.logger.error(
                "slot \(slot.index) unhealthy for \(service.configuration.failoverAfterMs) ms, through restarts: failing over")
            failOver(service, slot)
        }
    }

    /// An unhealthy worker is replaced at once: a new worker starts on the slot's sockets, and
    /// the old one is stopped as one that missed its watchdog (SIGABRT, for a core or backtrace
    /// of what it was stuck in; SIGKILL at the stop timeout), with SIGCONT so that a stopped one
    /// (SIGSTOP) gets it now. Its dying (a backtrace can take seconds) holds nothing up: it
    /// reads nothing more, and what waits at the socket goes to the new worker.
    private func restartUnhealthy(_ service: ServiceRuntime, _ slot: SlotRecord, failures: Int, now: Int64) {
        guard let pid = slot.pid else { return }
        let stopMs = configuration.stopTimeoutMs
        service.logger.error(
            "slot \(slot.index): worker pid \(pid) failed \(failures) health checks in a row: replaced; SIGABRT, SIGKILL after \(stopMs) ms (health restart \(healthChecks.record(service.name, slot.index)?.restarts ?? 0))")
        table.leaveSlot(pid)
        table.stop(pid, killAt: now + stopMs.msAsNs)
        signal(pid, SIGABRT)
        signal(pid, SIGCONT)
        slot.pid = nil
        startWorker(service, slot, now: now)
    }

    static func printable(_ bytes: [UInt8]) -> String {
        let text = bytes.prefix(64).map { (32..<127).contains($0) ? String(UnicodeScalar($0)) : "." }.joined()
        return "\"\(text)\(bytes.count > 64 ? "…" : "")\""
    }

    /// Closes every probe in flight (the daemon stops, or a service goes).
    func closeHealthProbes(of service: ServiceRuntime? = nil) {
        for (fd, probe) in healthChecks.inFlight where service == nil || probe.service === service {
            probe.socket.close()
            healthChecks.inFlight.removeValue(forKey: fd)
        }
    }
}

extension Supervisor {
    /// A slot's health checks, for `status`.
    func healthStatus(_ service: String, _ slot: UInt32) -> SlotHealthStatus {
        let health = healthChecks.record(service, slot) ?? SlotHealth()
        return SlotHealthStatus(healthy: health.isHealthy, probes: health.probes, passed: health.passed,
                                failed: health.failed, unreached: health.unreached,
                                unaddressable: health.unaddressable, consecutiveFailures: health.consecutiveFailures,
                                restarts: health.restarts, failovers: health.failovers,
                                lastProblem: health.lastProblem)
    }
}
