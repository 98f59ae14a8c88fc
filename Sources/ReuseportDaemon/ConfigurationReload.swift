import ReuseportControl
import ReuseportKit

/// Re-reads the configuration file and applies the difference (SIGHUP or `reuseportctl
/// reload`). A bad file changes nothing.
struct ConfigurationReload {
    /// nil: the embedded demo configuration.
    let configPath: String?
    let supervisor: Supervisor

    func apply() -> ControlResponse {
        guard !supervisor.stopping else { return .failure("the daemon is stopping") }
        let next: DaemonConfiguration
        do {
            next = try Daemon.loadConfiguration(path: configPath)
        } catch {
            return .failure("the configuration is invalid, nothing changed: \(error)")
        }
        var notes: [String] = []
        var failures: [String] = []
        let now = MonotonicClock.nanoseconds()
        let wanted = Dictionary(uniqueKeysWithValues: next.services.map { ($0.name, $0) })
        // Stop what goes (or needs new sockets) first: its addresses may be reused below.
        let keeps: (ServiceRuntime) -> Bool = { wanted[$0.name]?.dataPlaneShape == $0.configuration.dataPlaneShape }
        let ownGroups = Set(supervisor.services.flatMap(\.listeners))
        for service in supervisor.services where !keeps(service) {
            supervisor.stopService(service, now: now)
            notes.append(wanted[service.name] == nil ? "removed \(service.name)" : "rebuilt \(service.name)")
        }
        supervisor.services.removeAll { !keeps($0) }
        supervisor.configuration.stopTimeoutMs = next.stopTimeoutMs
        for new in next.services {
            guard let service = supervisor.service(named: new.name) else {
                do {
                    supervisor.startWorkers(of: try supervisor.addService(new, ownGroups: ownGroups))
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
                for slot in service.slots { supervisor.restart(service, slot) }
                notes.append("\(service.name): workers restarted with the new program")
            }
            if new.workers != service.slots.count {
                do {
                    let moved = try supervisor.scale(service, to: new.workers)
                    notes.append("\(service.name): \(new.workers) workers, \(moved) buckets moved")
                } catch {
                    failures.append("\(service.name): cannot change to \(new.workers) workers: \(error)")
                }
            }
        }
        supervisor.configuration.services = supervisor.services.map(\.configuration)
        let summary = notes.isEmpty ? "no change" : notes.joined(separator: "; ")
        if !failures.isEmpty {
            return ControlResponse(ok: false, error: failures.joined(separator: "; "), message: summary,
                                   services: supervisor.status(of: nil))
        }
        supervisor.logger.notice("configuration reloaded: \(summary)")
        return ControlResponse(ok: true, message: "reloaded: \(summary)", services: supervisor.status(of: nil))
    }
}
