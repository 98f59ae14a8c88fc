#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportControl
import ReuseportKit

/// Answers the control socket's commands (ReuseportControl/ControlProtocol.swift): status,
/// restart and scale through the supervisor, reload through `ConfigurationReload`.
struct ControlCommands {
    let supervisor: Supervisor
    let reload: ConfigurationReload

    func handle(_ request: ControlRequest) -> ControlResponse {
        let targets = supervisor.services.map {
            ControlTarget(name: $0.name, slots: $0.slots.map(\.index), bucketCount: $0.configuration.bucketCount)
        }
        let action: ControlAction
        do {
            action = try ControlAction(checking: request, against: targets)
        } catch {
            return .failure(error.description)
        }
        switch action {
        case .status(let name):
            return ControlResponse(ok: true, services: supervisor.status(of: name),
                                   ignoredNotifications: supervisor.notify?.ignored,
                                   daemon: DaemonIdentity(pid: getpid(), startedAtNs: supervisor.imageStartedAtNs,
                                                          version: BuildVersion.string))
        case .reload:
            let response = reload.apply()
            // As for SIGHUP: the log says why a reload was refused, not only the one who asked.
            if !response.ok { supervisor.logger.error("reload (control): \(response.error ?? "")") }
            return response
        case .reexec:
            if let busy = supervisor.reexecRefusal { return .failure(busy) }
            supervisor.reexecRequested = true
            return ControlResponse(ok: true, message: "re-executing \(supervisor.executable) in pid \(getpid()): "
                + "\(supervisor.table.servingCount) workers stay and are adopted")
        case .restart(let position, let index):
            let service = supervisor.services[position]
            guard let slot = service.slot(index) else {
                return .failure("service \(service.name) has no slot \(index)")
            }
            let failures = supervisor.restart(service, slot).map { [SlotStartFailure(slot: index, error: "\($0)")] }
            return ControlResponse(ok: true,
                                   message: "restarting slot \(index) of \(service.name)" + sentence(failures ?? []),
                                   services: supervisor.status(of: service.name), startFailures: failures)
        case .scale(let position, let workers, let now, let dryRun):
            let service = supervisor.services[position]
            if dryRun {
                do {
                    let plan = try service.planResize(to: workers, now: MonotonicClock.nanoseconds())
                    return ControlResponse(ok: true, message: describe(plan, of: service, to: workers, now: now, done: false),
                                           services: supervisor.status(of: service.name))
                } catch {
                    return .failure("planning \(service.name) at \(workers) workers failed: \(error)")
                }
            }
            do {
                let (plan, failed) = try supervisor.scaleReportingStarts(service, to: workers, immediately: now)
                let failures = failed.map { SlotStartFailure(slot: $0.slot, error: "\($0.error)") }
                return ControlResponse(ok: true,
                                       message: describe(plan, of: service, to: workers, now: now, done: true)
                                           + sentence(failures),
                                       services: supervisor.status(of: service.name),
                                       startFailures: failures.isEmpty ? nil : failures)
            } catch {
                return .failure("scaling \(service.name) to \(workers) failed: \(error)")
            }
        case .upgrade(let position, let rollback):
            return upgrade(supervisor.services[position], rollback: rollback)
        }
    }

    /// Starts an upgrade (or a roll back) and says what happens next.
    func upgrade(_ service: ServiceRuntime, rollback: Bool) -> ControlResponse {
        do {
            let upgrade = rollback ? try supervisor.rollBack(service) : try supervisor.beginUpgrade(service)
            let status = upgrade.status
            let slots = status.slots.map(String.init).joined(separator: ", ")
            let message: String
            if rollback {
                message = "rolling \(service.name) back to generation \(status.generation) (slots \(slots)): new flows "
                    + "go there from the switch on; generation \(status.previous)'s live flows stay until idle"
            } else {
                message = "upgrading \(service.name) to generation \(status.generation) on slots \(slots): the switch "
                    + "waits until every new worker is ready (at most \(service.configuration.readyTimeoutMs) ms); "
                    + "generation \(status.previous) takes every flow until then"
            }
            return ControlResponse(ok: true, message: message, services: supervisor.status(of: service.name))
        } catch {
            return ControlResponse(ok: false, error: "\(service.name): \(error)", services: supervisor.status(of: service.name))
        }
    }

    /// What a scale does or would do, in one sentence.
    func describe(_ plan: TransitionPlan, of service: ServiceRuntime, to workers: Int, now: Bool, done: Bool) -> String {
        let verb = done ? "scaled" : "scaling"
        var text = "\(verb) \(service.name) to \(workers) workers: \(plan.movingBuckets) of \(plan.bucketCount) buckets "
        let share = plan.bucketCount > 0 ? Double(plan.movingBuckets) * 100 / Double(plan.bucketCount) : 0
        let leaving = plan.leaving.map(String.init).joined(separator: ", ")
        if now || !service.plane.tracksFlows {
            text += (done ? "moved" : "move") + " at once"
            text += String(format: ": the live flows of those buckets (about %.1f%% of all) move", share)
            if !plan.leaving.isEmpty {
                text += "; slots \(leaving) retire now"
                if plan.recordedFlowsOnLeaving > 0 { text += ", moving their \(plan.recordedFlowsOnLeaving) recorded flows" }
            }
        } else {
            let learnMs = max(plan.switchNs - MonotonicClock.nanoseconds(), 0) / 1_000_000
            text += done ? "switch in \(learnMs) ms" : "switch after \(service.configuration.tracking.idleTimeoutMs) ms"
            text += " (flow_idle_timeout_ms), their live flows recorded and kept"
            if !plan.leaving.isEmpty { text += "; slots \(leaving) leave: from the switch on they take no new flow, and they retire once their recorded flows are idle" }
        }
        return text
    }

    /// "; slot 24 could not start (…), retried after the back-off", or nothing when all started.
    func sentence(_ failures: [SlotStartFailure]) -> String {
        guard !failures.isEmpty else { return "" }
        let list = failures.map { "slot \($0.slot) could not start (\($0.error))" }.joined(separator: "; ")
        return "; \(list); retried after the restart back-off"
    }
}

/// What checking a request needs to know of one service the daemon runs.
package struct ControlTarget: Sendable, Equatable {
    package var name: String
    package var slots: [UInt32]
    package var bucketCount: Int

    package init(name: String, slots: [UInt32], bucketCount: Int) {
        self.name = name
        self.slots = slots
        self.bucketCount = bucketCount
    }
}

/// A decoded request checked against the services, before anything is done: which service
/// (its position in the list checked against) and which slot or worker count. Needs no
/// live daemon, so the fuzzer (Tests/fuzz) runs it on every request it decodes.
package enum ControlAction: Sendable, Equatable {
    case status(service: String?)
    case reload
    case restart(service: Int, slot: UInt32)
    case scale(service: Int, workers: Int, now: Bool, dryRun: Bool)
    case reexec
    case upgrade(service: Int, rollback: Bool)

    /// Throws the sentence the client gets when the request names no such service, slot or count.
    package init(checking request: ControlRequest, against services: [ControlTarget]) throws(ControlRequestError) {
        func target() throws(ControlRequestError) -> Int {
            if let name = request.service, let position = services.firstIndex(where: { $0.name == name }) {
                return position
            }
            // Without a service name, the only service, if there is exactly one.
            if request.service == nil && services.count == 1 { return 0 }
            let names = services.map(\.name).joined(separator: ", ")
            guard let name = request.service else {
                throw ControlRequestError(description: "name a service: this daemon runs \(names)")
            }
            throw ControlRequestError(description: "no service named '\(name)': this daemon runs \(names)")
        }
        switch request.command {
        case .status:
            self = .status(service: request.service)
        case .reload:
            self = .reload
        case .reexec:
            self = .reexec
        case .restart:
            let position = try target()
            let service = services[position]
            guard let slot = request.slot, service.slots.contains(slot) else {
                let range = service.slots.min().map { "its slots are \($0) to \(service.slots.max() ?? $0)" }
                    ?? "it has none"
                throw ControlRequestError(description: "service \(service.name) has no slot "
                    + "\(request.slot.map(String.init) ?? "(none given)"): \(range)")
            }
            self = .restart(service: position, slot: slot)
        case .scale:
            let position = try target()
            let service = services[position]
            guard let workers = request.workers, SlotCount.range.contains(workers), workers <= service.bucketCount
            else {
                throw ControlRequestError(description: "scale needs a worker count between 1 and "
                    + "\(min(SlotCount.range.upperBound, service.bucketCount)), "
                    + "got \(request.workers.map(String.init) ?? "none")")
            }
            self = .scale(service: position, workers: workers, now: request.now ?? false, dryRun: request.dryRun ?? false)
        case .upgrade:
            self = .upgrade(service: try target(), rollback: request.rollback ?? false)
        }
    }
}

extension Supervisor {
    /// The control protocol's view of the services named (nil: all).
    func status(of name: String?) -> [ServiceStatus] {
        services.filter { name == nil || $0.name == name }.map { service in
            let buckets = service.bucketCounts()
            return ServiceStatus(
                name: service.name, listeners: service.listeners.map(\.description), workers: service.slots.count,
                pinDirectory: service.pins.serviceDirectory,
                slots: service.slots.map { slot -> SlotStatus in
                    let drops = drops(of: service, slot)
                    return SlotStatus(slot: slot.index, pid: slot.pid, state: slot.state.description,
                                      restarts: Int(slot.restarts), buckets: buckets[slot.index] ?? 0,
                                      droppedOutputLines: drops.lines, droppedOutputBytes: drops.bytes,
                                      watchdogRestarts: Int(slot.watchdogRestarts), stalls: Int(slot.stalls),
                                      notifiedReady: slot.notifiedReady, notifiedStatus: slot.notifiedStatus,
                                      generation: Int(slot.generation), readySinceNs: slot.readySinceNs)
                },
                failovers: service.failovers, rescueStarts: service.rescueStarts,
                removedSlotDrops: service.removedSlotDrops, adoptedWorkers: service.adoptedWorkers,
                refusedAdoptions: service.refusedAdoptions, generation: Int(service.plane.workingGeneration),
                upgrade: service.upgrade?.status, upgrades: service.upgradeCounts,
                leaving: leavingWorkers(of: service.name),
                settings: ServiceSettings(flowTracking: service.plane.tracksFlows,
                                          flowIdleTimeoutMs: service.plane.options.tracking.idleTimeoutMs,
                                          readyTimeoutMs: service.configuration.readyTimeoutMs),
                invariantViolations: service.plane.invariantViolations + workerInvariantViolations)
        }
    }

    /// The workers of `service` that left their slot and have not exited, by pid.
    func leavingWorkers(of service: String) -> [LeavingWorker] {
        leaving(of: service).map { record in
            let state: LeavingWorker.State = switch record.value.state {
            case RP_LEAVING_DRAINING.rawValue: .draining
            case RP_LEAVING_HOLDING.rawValue: .holding
            default: .stopping
            }
            return LeavingWorker(pid: record.pid, slot: record.value.slot, generation: Int(record.value.generation),
                                 state: state)
        }
    }
}
