#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Everything the supervisor waits for, in one list: it decides both what `fireTimers`
/// does now and how long the loop may sleep (`nextDeadline`). Each timer's condition is
/// written once, in `deadline(of:)`: a deadline that nothing would act on must not be
/// listed, or poll() would return at once, again and again (e.g. a failover while stopping).
enum SupervisorTimer {
    /// A slot in back-off: start its next worker.
    case start(ServiceRuntime, SlotRecord)
    /// A starting worker has lived `readyAfterMs`: it is running.
    case ready(ServiceRuntime, SlotRecord)
    /// A slot has been down `failoverAfterMs`: its buckets go to live slots.
    case failover(ServiceRuntime, SlotRecord)
    /// A worker being stopped did not stop in time: SIGKILL.
    case kill(pid_t)
    /// A removed slot's worker is reading what was queued at its sockets: check the queues.
    case drain(pid_t)
    /// A worker sent no `WATCHDOG=1` for `watchdog_ms`: SIGABRT (WorkerLiveness.swift).
    case watchdog(ServiceRuntime, SlotRecord)
    /// Once a second: sample the slots' receive queues for stalled workers.
    case stallCheck
    /// A placement change in progress: switch when learning is over, sweep records, retire
    /// drained slots (Supervisor.checkTransition).
    case transition(ServiceRuntime)
    /// Active health checks: a probe to send, a TCP connect to look at, a probe's timeout
    /// (HealthCheck.swift).
    case healthCheck
    /// A starting generation's workers are not all ready by `ready_timeout_ms`: it is abandoned.
    case upgrade(ServiceRuntime)
}

extension Supervisor {
    /// Every timer, slot by slot (start, ready, failover, watchdog), then the stopping and
    /// draining workers, then the stall check.
    func timers() -> [SupervisorTimer] {
        var timers: [SupervisorTimer] = []
        for service in services {
            timers += [.transition(service), .upgrade(service)]
            for slot in service.slots {
                timers += [.start(service, slot), .ready(service, slot), .failover(service, slot),
                           .watchdog(service, slot)]
            }
        }
        return timers + table.stoppingPids.map { .kill($0) } + table.drainingPids.map { .drain($0) } + [.stallCheck, .healthCheck]
    }

    /// When `timer` is due, or nil while its condition does not hold.
    func deadline(of timer: SupervisorTimer) -> Int64? {
        switch timer {
        case .start(_, let slot):
            return slot.lifecycle.startDeadline(hasWorker: slot.pid != nil, stopping: stopping)
        case .ready(let service, let slot):
            // A worker that speaks sd_notify (`notify = true`) is ready when it says so (`notified`).
            return slot.lifecycle.readyDeadline(
                waitsForReady: slot.pid != nil && (slot.state == .starting || slot.state == .failedOver)
                    && !service.notifies(slot),
                policy: service.configuration.restart)
        case .failover(let service, let slot):
            return slot.lifecycle.failoverDeadline(failoverAfterMs: service.configuration.failoverAfterMs,
                                                   failedOver: service.isFailedOver(slot), stopping: stopping)
        case .kill(let pid):
            // Int64.max: SIGKILL sent, waiting for SIGCHLD.
            guard let deadline = table.killAt(pid), deadline != Int64.max else { return nil }
            return deadline
        case .drain(let pid):
            return table.drain(of: pid)?.nextCheck
        case .watchdog(let service, let slot):
            return slot.lifecycle.watchdogTimer(hasWorker: slot.pid != nil, stopping: stopping,
                                                watchdogMs: service.configuration.watchdogMs)
        case .stallCheck:
            guard !stopping, hasStallCheck else { return nil }
            return nextStallCheck
        case .healthCheck:
            return nextHealthCheck
        case .transition(let service):
            guard !stopping else { return nil }
            return service.nextTransitionCheck
        case .upgrade(let service):
            guard !stopping else { return nil }
            return service.upgrade?.readyDeadline
                ?? (service.upgrade?.status.phase == .canary ? service.upgrade?.bake?.nextCheck : nil)
        }
    }

    func nextDeadline() -> Int64? { timers().compactMap(deadline(of:)).min() }

    /// Acts on every timer due at `now`. Each is checked again just before it fires: an
    /// earlier one may have changed its slot (a worker that became ready is not failed over).
    func fireTimers(now: Int64) {
        for timer in timers() {
            guard let at = deadline(of: timer), at <= now else { continue }
            switch timer {
            case .start(let service, let slot):
                startWorker(service, slot, now: now)
            case .ready(let service, let slot):
                becameReady(service, slot)
            case .failover(let service, let slot):
                failOver(service, slot)
            case .kill(let pid):
                logger.warning("worker pid \(pid) did not stop in time: SIGKILL")
                signal(pid, SIGKILL)
                // One watched through a pidfd (adopted or found in the pins) need not lead its
                // process group, which the line above signals: the pidfd names it in any case.
                if let pidfd = table.pidfd(of: pid) { try? Syscall.pidfdSignal(pidfd, SIGKILL) }
                table.killSent(pid)
            case .drain(let pid):
                checkDrain(pid, now: now)
            case .watchdog(let service, let slot):
                watchdogExpired(service, slot, now: now)
            case .stallCheck:
                checkStalls(now: now)
            case .healthCheck:
                runHealthChecks(now: now)
            case .transition(let service):
                checkTransition(service, now: now)
            case .upgrade(let service):
                upgradeTimedOut(service, now: now)
            }
        }
    }

    func becameReady(_ service: ServiceRuntime, _ slot: SlotRecord) {
        slot.lifecycle.ready(now: MonotonicClock.nanoseconds(), rescue: &service.rescue)
        if service.isFailedOver(slot), let restored = service.restore(slot, now: MonotonicClock.nanoseconds()) {
            if service.plane.pending != nil {
                service.logger.notice(
                    "slot \(slot.index) is healthy again: its \(restored) buckets come back once their live flows are recorded")
                service.nextTransitionCheck = MonotonicClock.nanoseconds()
            } else {
                service.logger.notice("slot \(slot.index) is healthy again: its \(restored) buckets are back")
            }
        }
        slot.readySinceNs = WallClock.nanoseconds()
        service.setWorkerState(slot, to: .running)
        checkUpgrade(service, now: MonotonicClock.nanoseconds())
    }

    func failOver(_ service: ServiceRuntime, _ slot: SlotRecord) {
        // A leaving slot has no buckets to lend: down this long, it retires, and its recorded
        // flows (which have no worker) follow the table.
        if service.plane.leaving.contains(slot.index) {
            service.logger.warning(
                "leaving slot \(slot.index) down for \(service.configuration.failoverAfterMs) ms: it retires now, its \(slot.records) recorded flows move")
            try? service.plane.forgetRecords(of: slot.index)
            retireLeaving(service, slot, now: MonotonicClock.nanoseconds())
            return
        }
        guard let lent = service.failOver(slot) else {
            // Not written (logged): try again after another failover delay, not in a busy loop.
            slot.lifecycle.failoverNotWritten(now: MonotonicClock.nanoseconds())
            return
        }
        service.logger.warning(
            "slot \(slot.index) down for \(service.configuration.failoverAfterMs) ms: its \(lent) buckets now point at live slots (failover \(service.failovers))")
        service.setWorkerState(slot, to: .failedOver)
    }
}
