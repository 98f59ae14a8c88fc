#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// Whether a worker that is alive also serves: its notifications (NOTIFY_SOCKET: `WATCHDOG=1`,
/// `READY=1`, `STATUS=`), its watchdog, and the stall check of its sockets' receive queues.
/// The timers are in SupervisorTimers.swift (`watchdog`, `stallCheck`).
extension Supervisor {
    /// How often the slots' sockets are sampled with sock_diag.
    static let stallCheckIntervalNs: Int64 = 1_000_000_000
    /// Samples in a row with a full queue and more drops before a slot is stalled: a burst that
    /// fills the queue for a moment is not a stall.
    static let stallSamplesToMark = 2

    /// Reads what is waiting at the notify socket.
    func readNotifications(now: Int64) {
        notify?.receive(logger: logger) { message, sender in notified(message, from: sender, now: now) }
    }

    /// Applies a notification to the worker that sent it. False when `sender` is not a worker
    /// of a slot (`worker(of:)`): a helper the worker forked may speak for it, as with systemd's
    /// NotifyAccess=all limited to the worker.
    func notified(_ message: NotifyMessage, from sender: pid_t, now: Int64) -> Bool {
        guard let leader = worker(of: sender), let (service, slot) = table.serving(leader), slot.pid == leader else {
            return false
        }
        if message.watchdog || message.watchdogTrigger {
            slot.lifecycle.watchdogNotified(now: now, watchdogMs: message.watchdog ? service.configuration.watchdogMs : 0,
                                            trigger: message.watchdogTrigger)
        }
        if message.ready, !slot.notifiedReady {
            slot.notifiedReady = true
            service.logger.debug("slot \(slot.index): worker pid \(leader) sent READY=1")
            if service.notifies(slot), slot.state == .starting || slot.state == .failedOver {
                becameReady(service, slot)
            }
        }
        if let status = message.status { slot.notifiedStatus = status }
        return true
    }

    /// The worker (its pid) that `pid` belongs to, if any: the worker itself; else, for a worker
    /// with a cgroup, a process in that cgroup and nothing else (as systemd decides by cgroup);
    /// only for a worker without one (no cgroup v2), a process in the process group it leads.
    ///
    /// The cgroup comes first and alone: a process group is no proof. Any process may join a
    /// group of its own session (setpgid(2)), and workers started by an older daemon share the
    /// daemon's session: a child of one worker could join another's group and send READY=1 for
    /// it. A process cannot leave its cgroup without write access to the cgroup folders, which
    /// are root's. Workers are now started in a session of their own (`WorkerSpawn`), so the
    /// process group of a worker without a cgroup can be joined only from inside that worker.
    func worker(of pid: pid_t) -> pid_t? {
        if table.serving(pid) != nil { return pid }
        if let cgroup = WorkerCgroups.cgroup(ofProcess: pid),
           let owner = table.serving.first(where: { table.processes(of: $0.pid)?.cgroup == cgroup })?.pid {
            return owner
        }
        guard let group = Syscall.processGroup(of: pid), table.serving(group) != nil, table.processes(of: group)?.cgroup == nil
        else { return nil }
        return group
    }

    /// A worker missed its watchdog: SIGABRT to every process of it (SIGKILL at the stop
    /// timeout), as systemd does for `WatchdogSec=`. Its exit restarts the slot the usual way.
    func watchdogExpired(_ service: ServiceRuntime, _ slot: SlotRecord, now: Int64) {
        guard slot.lifecycle.watchdogExpired(hasWorker: slot.pid != nil), let pid = slot.pid else { return }
        slot.watchdogRestarts &+= 1
        let stopMs = configuration.stopTimeoutMs
        service.logger.error(
            "slot \(slot.index): worker pid \(pid) sent no WATCHDOG=1 for \(service.configuration.watchdogMs) ms: SIGABRT, SIGKILL after \(stopMs) ms (watchdog restart \(slot.watchdogRestarts))")
        signal(pid, SIGABRT)
        table.stop(pid, killAt: now + stopMs.msAsNs, keepingEarlier: true)
        service.publish(slot)
    }

    /// Whether some service has a UDP listener to sample.
    var hasStallCheck: Bool {
        services.contains { $0.listeners.contains { $0.transport == .udp } }
    }

    /// Samples every UDP socket of every slot (sock_diag) and marks a running slot stalled when
    /// its receive queue stayed full while its drops grew (`stallSamplesToMark` samples in a
    /// row), and a stalled one running again once the queue has drained.
    func checkStalls(now: Int64) {
        nextStallCheck = now + Supervisor.stallCheckIntervalNs
        let diagnoses: [UInt64: SocketDiagnosis]
        do {
            if sockDiag == nil { sockDiag = try SocketDiagnostics.openSocket() }
            diagnoses = try SocketDiagnostics.sockets([.udp], using: sockDiag!)
            if stallCheckFailing {
                logger.notice("stall check: sock_diag answers again")
                stallCheckFailing = false
            }
        } catch {
            if !stallCheckFailing { logger.warning("stall check: cannot sample the sockets: \(error)") }
            stallCheckFailing = true
            return
        }
        for service in services {
            for slot in service.slots {
                let sockets = service.plane.sockets(ofSlot: slot.index).filter { $0.endpoint.transport == .udp }
                let seen = sockets.compactMap { socket in (try? socket.cookie()).flatMap { diagnoses[$0] } }
                guard !seen.isEmpty else { continue }
                let sample = slot.stallSamples.add(seen)
                if let packets = try? service.plane.maps.slotCounters(slot.index).packets {
                    slot.traffic = SlotTraffic(packets: packets, drops: sample.drops)
                }
                switch StallVerdict(state: slot.state, fullWithGrowingDrops: sample.fullWithGrowingDrops,
                                    drained: sample.drained, samplesToMark: Supervisor.stallSamplesToMark) {
                case .stalled:
                    slot.stalls &+= 1
                    service.logger.error(
                        "slot \(slot.index): worker pid \(slot.pid ?? 0) is not reading: its receive queue is full and the kernel dropped \(sample.newDrops) datagrams in the last second (stall \(slot.stalls))")
                    service.setWorkerState(slot, to: .stalled)
                case .runningAgain:
                    service.logger.notice("slot \(slot.index): receive queue drained, running again")
                    service.setWorkerState(slot, to: .running)
                case .unchanged:
                    break
                }
            }
        }
    }
}

/// What the stall check saw of one slot's sockets.
struct StallSamples {
    /// Drops summed over the slot's sockets at the last sample.
    private var lastDrops: UInt64?
    /// The same, 0 before the first sample.
    var drops: UInt64 { lastDrops ?? 0 }
    /// Samples in a row with a full queue and more drops than the sample before.
    private(set) var fullWithGrowingDrops = 0
    private(set) var newDrops: UInt64 = 0
    /// Every queue holds less than half its buffer.
    private(set) var drained = false

    /// A queue is full at three quarters of SO_RCVBUF: UDP drops a datagram that does not fit
    /// the rest, so a queue nobody reads stays within one datagram's truesize of the limit.
    static func isFull(_ socket: SocketDiagnosis) -> Bool {
        guard let memory = socket.receiveMemory, let buffer = socket.receiveBuffer, buffer > 0 else { return false }
        return memory * 4 >= buffer * 3
    }

    static func isDrained(_ socket: SocketDiagnosis) -> Bool {
        guard let memory = socket.receiveMemory, let buffer = socket.receiveBuffer else { return true }
        return memory * 2 < buffer
    }

    mutating func add(_ sockets: [SocketDiagnosis]) -> StallSamples {
        let drops = sockets.compactMap(\.drops).reduce(0, +)
        newDrops = lastDrops.map { drops > $0 ? drops - $0 : 0 } ?? 0
        lastDrops = drops
        if newDrops > 0, sockets.contains(where: StallSamples.isFull) {
            fullWithGrowingDrops += 1
        } else {
            fullWithGrowingDrops = 0
        }
        drained = sockets.allSatisfy(StallSamples.isDrained)
        return self
    }
}

/// What one slot was sent and what the kernel dropped at its sockets, both since they opened.
struct SlotTraffic: Equatable {
    var packets: UInt64
    var drops: UInt64
}
