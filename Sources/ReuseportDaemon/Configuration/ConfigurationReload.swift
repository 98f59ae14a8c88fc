import ReuseportControl
import ReuseportKit

/// Re-reads the configuration file and applies the difference (SIGHUP or `reuseportctl
/// reload`). A bad file changes nothing, and neither does one that cannot be applied (an
/// address taken, a program the verifier refuses): new data planes are built beside the
/// running ones, make-before-break, before anything running is touched.
struct ConfigurationReload {
    /// nil: the embedded demo configuration.
    let configPath: String?
    let supervisor: Supervisor
    /// Told when a reload starts and ends (`RELOADING=1`, then `READY=1`).
    var serviceManager: ServiceManagerNotifier?

    /// Applies the file; the service manager sees the reload begin and end, whatever its outcome,
    /// and the outcome becomes the supervisor's last event.
    func apply() -> ControlResponse {
        guard !supervisor.stopping else { return .failure("the daemon is stopping") }
        serviceManager?.reloading()
        let response = applyChanges()
        if response.ok {
            supervisor.lastEvent = response.message
        } else {
            supervisor.lastEvent = "reload refused: \(response.error ?? "")"
        }
        serviceManager?.reloaded()
        return response
    }

    private func applyChanges() -> ControlResponse {
        let next: DaemonConfiguration
        do {
            next = try ConfigurationCheck.load(path: configPath, executable: supervisor.executable)
        } catch {
            return .failure("the configuration is invalid, nothing changed: \(error)")
        }
        let waiting = next.services.compactMap { new in
            supervisor.service(named: new.name).flatMap { supervisor.reloadRefusal($0, to: new) }
        }
        if !waiting.isEmpty {
            return .failure("the configuration cannot be applied while a canary bakes, nothing changed: "
                + waiting.joined(separator: "; "))
        }
        var notes: [String] = []
        var failures: [String] = []
        let wanted = Dictionary(uniqueKeysWithValues: next.services.map { ($0.name, $0) })
        // First every new data plane (a service added, or one whose sockets or program change)
        // is built beside what runs. If one cannot be, the others are discarded and nothing
        // has changed: no old socket was closed, no worker stopped, no pin touched.
        let ownGroups = Set(supervisor.services.flatMap(\.listeners))
        var staged: [(new: ServiceRuntime, old: ServiceRuntime?)] = []
        for new in next.services {
            let old = supervisor.service(named: new.name)
            // A worker count the running maps have no room for (SlotCapacity) rebuilds the service too.
            if let old, old.configuration.dataPlaneShape == new.dataPlaneShape,
               old.plane.maps.holdsSlots(forWorkers: new.workers) { continue }
            do {
                staged.append((try supervisor.stageService(new, ownGroups: ownGroups, predecessor: old), old))
            } catch {
                for service in staged { service.new.close() }
                return .failure("the configuration cannot be applied, nothing changed: \(error)")
            }
        }
        // Then each takes over: its workers start, its program is attached (the switch), the
        // old workers and sockets go. Only then do removed services stop: an address that moves
        // from a removed service to an added one is never left without a socket.
        for (new, old) in staged {
            let moved = old.flatMap { $0.movedShare(to: new) } ?? 0
            do {
                try supervisor.replace(old, with: new)
            } catch {
                failures.append("\(error)")
                continue
            }
            if old == nil {
                notes.append("added \(new.name)")
            } else if moved > 0 {
                notes.append("rebuilt \(new.name) (\(percent(moved)) of flows moved to another slot)")
                new.logger.notice("rebuilt: \(percent(moved)) of flows moved to another slot (estimated from 4096 sampled flows)")
            } else {
                notes.append("rebuilt \(new.name)")
            }
            // The rebuilt plane has the slots the running one had (a `reuseportctl scale` since
            // the last reload, say): the file's worker count applies as a scale, as without a rebuild.
            if let workers = wanted[new.name]?.workers, workers != new.configuration.workers {
                do {
                    let moved = try supervisor.scale(new, to: workers)
                    let when = new.plane.pending != nil ? "switch once their live flows are recorded" : "moved"
                    notes.append("\(new.name): \(workers) workers, \(moved) buckets \(when)")
                } catch {
                    failures.append("\(new.name): cannot change to \(workers) workers: \(error)")
                }
            }
        }
        let now = MonotonicClock.nanoseconds()
        for service in supervisor.services where wanted[service.name] == nil {
            supervisor.stopService(service, now: now)
            notes.append("removed \(service.name)")
        }
        supervisor.services.removeAll { wanted[$0.name] == nil }
        supervisor.configuration.stopTimeoutMs = next.stopTimeoutMs
        let rebuilt = Set(staged.map { ObjectIdentifier($0.new) })
        for new in next.services {
            guard let service = supervisor.service(named: new.name), !rebuilt.contains(ObjectIdentifier(service))
            else { continue }
            // A new worker definition is a new generation: new slots and workers beside the running
            // ones, switched to once all are ready, the old ones draining (Upgrade.swift).
            let definitionChanged = new.workerDefinition != service.configuration.workerDefinition
            service.update(new)
            if definitionChanged {
                do {
                    let upgrade = try supervisor.beginUpgrade(service, to: new.workerDefinition, workers: new.workers)
                    let slots = upgrade.status.slots.map(String.init).joined(separator: ", ")
                    notes.append("\(service.name): upgrade to generation \(upgrade.status.generation) started on slots "
                        + "\(slots), switching once every new worker is ready")
                } catch {
                    failures.append("\(service.name): cannot start an upgrade to the new worker definition: \(error)")
                }
            } else if new.workers != service.configuration.workers {
                do {
                    let moved = try supervisor.scale(service, to: new.workers)
                    let when = service.plane.pending != nil ? "switch once their live flows are recorded" : "moved"
                    notes.append("\(service.name): \(new.workers) workers, \(moved) buckets \(when)")
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

/// 0.748 → "74.8%".
private func percent(_ share: Double) -> String {
    let tenths = Int((share * 1000).rounded())
    return "\(tenths / 10).\(tenths % 10)%"
}
