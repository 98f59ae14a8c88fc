import CReuseportABI
import ReuseportControl
import ReuseportKit

/// Answers the control socket's commands (ReuseportControl/ControlProtocol.swift): status,
/// restart and scale through the supervisor, reload through `ConfigurationReload`.
struct ControlCommands {
    let supervisor: Supervisor
    let reload: ConfigurationReload

    func handle(_ request: ControlRequest) -> ControlResponse {
        switch request.command {
        case .status:
            return ControlResponse(ok: true, services: supervisor.status(of: request.service),
                                   ignoredNotifications: supervisor.notify?.ignored)
        case .reload:
            let response = reload.apply()
            // As for SIGHUP: the log says why a reload was refused, not only the one who asked.
            if !response.ok { supervisor.logger.error("reload (control): \(response.error ?? "")") }
            return response
        case .restart:
            guard let service = request.service.flatMap(supervisor.service(named:)) ?? soleService(request.service) else {
                return .failure(unknownService(request.service))
            }
            guard let index = request.slot, let slot = service.slot(index) else {
                return .failure("service \(service.name) has no slot \(request.slot.map(String.init) ?? "(none given)"): "
                    + "its slots are 0 to \(service.slots.count - 1)")
            }
            let failures = supervisor.restart(service, slot).map { [SlotStartFailure(slot: index, error: "\($0)")] }
            return ControlResponse(ok: true,
                                   message: "restarting slot \(index) of \(service.name)" + sentence(failures ?? []),
                                   services: supervisor.status(of: service.name), startFailures: failures)
        case .scale:
            guard let service = request.service.flatMap(supervisor.service(named:)) ?? soleService(request.service) else {
                return .failure(unknownService(request.service))
            }
            guard let workers = request.workers, SlotCount.range.contains(workers),
                  workers <= service.configuration.bucketCount
            else {
                return .failure("scale needs a worker count between 1 and "
                    + "\(min(SlotCount.range.upperBound, service.configuration.bucketCount)), got \(request.workers.map(String.init) ?? "none")")
            }
            do {
                let (moved, failed) = try supervisor.scaleReportingStarts(service, to: workers)
                let failures = failed.map { SlotStartFailure(slot: $0.slot, error: "\($0.error)") }
                return ControlResponse(ok: true,
                                       message: "scaled \(service.name) to \(workers) workers, \(moved) buckets moved"
                                           + sentence(failures),
                                       services: supervisor.status(of: service.name),
                                       startFailures: failures.isEmpty ? nil : failures)
            } catch {
                return .failure("scaling \(service.name) to \(workers) failed: \(error)")
            }
        }
    }

    /// "; slot 24 could not start (…), retried after the back-off", or nothing when all started.
    func sentence(_ failures: [SlotStartFailure]) -> String {
        guard !failures.isEmpty else { return "" }
        let list = failures.map { "slot \($0.slot) could not start (\($0.error))" }.joined(separator: "; ")
        return "; \(list); retried after the restart back-off"
    }

    /// Without a service name, the only service, if there is exactly one.
    func soleService(_ name: String?) -> ServiceRuntime? {
        name == nil && supervisor.services.count == 1 ? supervisor.services[0] : nil
    }

    func unknownService(_ name: String?) -> String {
        let names = supervisor.services.map(\.name).joined(separator: ", ")
        guard let name else { return "name a service: this daemon runs \(names)" }
        return "no service named '\(name)': this daemon runs \(names)"
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
                                      notifiedReady: slot.notifiedReady, notifiedStatus: slot.notifiedStatus)
                },
                failovers: service.failovers, rescueStarts: service.rescueStarts,
                removedSlotDrops: service.removedSlotDrops)
        }
    }
}
