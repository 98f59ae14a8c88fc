#if canImport(Glibc)
import Glibc
#endif
import ReuseportControl
import ReuseportKit

/// One upgrade of a service: a new generation of workers on new slots, which takes flows only
/// once every one of its workers is ready. Until then no bucket and no fallback entry names its
/// slots (`ServiceDataPlane.startGeneration`), so a bad deploy never takes a flow: a worker
/// that exits before the switch, or one not ready by `ready_timeout_ms`, abandons it, and the
/// working generation serves on as if nothing had happened.
///
/// Once all are ready the change is a placement change of every bucket
/// (`ServiceDataPlane.switchGeneration`): the buckets learn the old generation's live flows for
/// one `flow_idle_timeout_ms`, switch to the new slots, and the old slots leave and drain as in
/// a scale-down (each retires once its recorded flows are idle, or at `drain_timeout_ms`).
final class Upgrade {
    var status: UpgradeStatus
    /// The new generation's slots (also in the service's `slots`).
    let records: [SlotRecord]
    /// When the upgrade is abandoned unless every new worker is ready (CLOCK_MONOTONIC); nil
    /// once it no longer waits for them.
    var readyDeadline: Int64?
    /// When the buckets switched (CLOCK_MONOTONIC).
    var switchedAt: Int64?
    /// The definition and worker count the service had before, restored if it is abandoned.
    let previousDefinition: WorkerDefinition
    let previousWorkers: Int
    /// A canary's bake (Canary.swift); nil for an upgrade that switches whole.
    var bake: CanaryBake?

    init(status: UpgradeStatus, records: [SlotRecord], readyDeadline: Int64?, previousDefinition: WorkerDefinition,
         previousWorkers: Int) {
        self.status = status
        self.records = records
        self.readyDeadline = readyDeadline
        self.previousDefinition = previousDefinition
        self.previousWorkers = previousWorkers
    }

    /// Not yet switched nor abandoned.
    var inProgress: Bool { status.phase == .starting || status.phase == .learning }
}

extension Supervisor {
    /// Starts a new generation of `service` running `definition` (nil: the current one again, as
    /// for a new binary at the same path) with `workers` workers (nil: as many as now). A
    /// generation still starting is abandoned for it; one learning refuses.
    @discardableResult
    func beginUpgrade(_ service: ServiceRuntime, to definition: WorkerDefinition? = nil, workers: Int? = nil) throws
        -> Upgrade
    {
        let now = MonotonicClock.nanoseconds()
        if let current = service.upgrade, current.inProgress {
            guard current.status.phase == .starting else {
                throw DaemonError.upgrade("generation \(current.status.generation) is learning the live flows it takes over; "
                    + "start another upgrade once it switched")
            }
            abandonUpgrade(service, reason: "replaced by a newer upgrade", now: now)
        }
        let plane = service.plane
        let count = workers ?? service.configuration.workers
        let previous = plane.workingGeneration
        let starting = try plane.startGeneration(count: count, now: now)
        let definition = definition ?? service.configuration.workerDefinition
        service.definitions[starting.generation] = definition
        let records: [SlotRecord]
        do {
            records = try starting.slots.map(service.makeRecord)
        } catch {
            try? plane.abandonGeneration(now: now)
            throw error
        }
        service.slots.append(contentsOf: records)
        service.slots.sort { $0.index < $1.index }
        socketStore?.store(service, slots: starting.slots)
        let timeoutMs = service.configuration.readyTimeoutMs
        let upgrade = Upgrade(
            status: UpgradeStatus(generation: Int(starting.generation), previous: Int(previous), phase: .starting,
                                  slots: starting.slots, startedNs: WallClock.nanoseconds()),
            records: records, readyDeadline: now + timeoutMs.msAsNs,
            previousDefinition: service.configuration.workerDefinition, previousWorkers: service.configuration.workers)
        if let canary = service.configuration.canary {
            upgrade.bake = CanaryBake(settings: canary)
            upgrade.status.canaryPercent = canary.percent
            upgrade.status.bakeMs = canary.bakeMs
        }
        service.upgrade = upgrade
        service.upgradeCounts.started += 1
        // From now on what the service runs is the new definition: a reload that says the same
        // starts nothing more, and an abandon puts the old one back.
        service.target(definition, workers: count)
        let readiness = definition.notify ? "sent READY=1" : "lived ready_after_ms"
        service.logger.notice(
            "generation \(starting.generation): starting \(count) workers on slots \(list(starting.slots)); generation \(previous) takes every flow until each has \(readiness), at most ready_timeout_ms (\(timeoutMs) ms)")
        lastEvent = "\(service.name): generation \(starting.generation) starting"
        for record in records {
            if let error = startWorker(service, record, now: now) {
                let reason = "slot \(record.index)'s worker could not start: \(error)"
                abandonUpgrade(service, reason: reason, now: now)
                throw DaemonError.upgrade("generation \(starting.generation) abandoned: \(reason)")
            }
        }
        return upgrade
    }

    /// Makes the generation still draining (the one the last upgrade replaced) the working one
    /// again: from the switch on it takes the new flows, and the generation working now drains,
    /// its live flows kept until idle.
    @discardableResult
    func rollBack(_ service: ServiceRuntime) throws -> Upgrade {
        let plane = service.plane
        guard let last = service.upgrade, last.status.phase == .switched else {
            throw DaemonError.upgrade("nothing to roll back to: \(service.name) has no switched upgrade "
                + (service.upgrade.map { "(the last is \($0.status.phase.rawValue))" } ?? "since the daemon started"))
        }
        let target = UInt32(last.status.previous)
        let now = MonotonicClock.nanoseconds()
        let plan: TransitionPlan
        do {
            plan = try plane.rollBack(to: target, now: now)
        } catch {
            throw DaemonError.upgrade("cannot roll \(service.name) back to generation \(target): \(error)")
        }
        let records = service.slots.filter { $0.generation == target }
        // Its workers are running already: ready, and learning, from now.
        let wall = WallClock.nanoseconds()
        let upgrade = Upgrade(
            status: UpgradeStatus(generation: Int(target), previous: Int(plane.workingGeneration), phase: .learning,
                                  slots: records.map(\.index), startedNs: wall, readyNs: wall, learningNs: wall,
                                  rollback: true),
            records: records, readyDeadline: nil, previousDefinition: service.configuration.workerDefinition,
            previousWorkers: service.configuration.workers)
        service.upgrade = upgrade
        service.target(service.definitions[target] ?? service.configuration.workerDefinition, workers: records.count)
        service.logger.notice(
            "rolling back to generation \(target) (slots \(list(records.map(\.index)))): every bucket learns the live flows of generation \(plane.workingGeneration) for \(max(plan.switchNs - now, 0) / 1_000_000) ms, then switches")
        service.nextTransitionCheck = now
        checkTransition(service, now: now)
        return upgrade
    }

    /// After a worker of the starting generation became ready: once every one is, the switch
    /// begins (learning, then the buckets move).
    func checkUpgrade(_ service: ServiceRuntime, now: Int64) {
        guard let upgrade = service.upgrade, upgrade.status.phase == .starting,
              upgrade.records.allSatisfy({ $0.pid != nil && $0.state == .running })
        else { return }
        if let bake = upgrade.bake { return startCanary(service, upgrade, bake, now: now) }
        guard let plan = beginReadyChange(service, upgrade, phase: .learning, what: "the switch", now: now, {
            try service.plane.switchGeneration(now: now)
        }) else { return }
        let learnMs = max(plan.switchNs - now, 0) / 1_000_000
        service.logger.notice(
            "generation \(upgrade.status.generation): all \(upgrade.records.count) workers ready; every bucket learns the live flows of generation \(upgrade.status.previous) for \(learnMs) ms, then switches")
        service.nextTransitionCheck = now
        checkTransition(service, now: now)
    }

    /// After a placement change switched: if it was an upgrade's, the new generation works now;
    /// the old one's workers get `drain_signal` and drain.
    func upgradeSwitched(_ service: ServiceRuntime, moved: Int, now: Int64) {
        let plane = service.plane
        guard let upgrade = service.upgrade, upgrade.status.phase == .learning,
              plane.workingGeneration == UInt32(upgrade.status.generation)
        else { return }
        upgrade.status.phase = .switched
        upgrade.status.switchedNs = WallClock.nanoseconds()
        upgrade.switchedAt = now
        service.upgradeCounts.switched += 1
        let old = service.slots.filter { plane.leaving.contains($0.index) && $0.generation != plane.workingGeneration }
        var signalled = ""
        if let drainSignal = service.configuration.drainSignal {
            for pid in old.compactMap(\.pid) { signal(pid, drainSignal) }
            signalled = "; drain_signal \(drainSignal) sent to their \(old.compactMap(\.pid).count) workers"
        }
        service.logger.notice(
            "generation \(upgrade.status.generation) works: \(moved) buckets switched; slots \(list(old.map(\.index))) drain, each stopped once its recorded flows are idle\(signalled)")
        lastEvent = "\(service.name): generation \(upgrade.status.generation) works"
        if let looping = upgrade.records.first(where: { $0.lifecycle.crashLoops }) {
            rollBackCrashLoop(service, looping)
        }
    }

    /// Whether `slot` belongs to a generation on trial: an upgrade's new generation from the start
    /// of its learning until the generation before it has retired (while it can still be rolled
    /// back to that one). Its workers' deaths all count as crashes.
    func isOnTrial(_ service: ServiceRuntime, _ slot: SlotRecord) -> Bool {
        trial(of: service)?.isOnTrial(slotGeneration: slot.generation) == true
    }

    /// The last upgrade of `service` as `GenerationTrial` sees it; nil without one.
    func trial(of service: ServiceRuntime) -> GenerationTrial? {
        guard let status = service.upgrade?.status else { return nil }
        let previous = UInt32(status.previous)
        return GenerationTrial(phase: status.phase, isRollback: status.rollback == true,
                               generation: UInt32(status.generation), previous: previous,
                               previousHasSlots: service.slots.contains { $0.generation == previous })
    }

    /// After a worker of `slot` exited: a generation that switched and whose workers keep dying
    /// (`SlotLifecycle.crashLoopExits` quick exits in a row on one slot) is rolled back to the
    /// generation still draining, whose workers never stopped serving their flows.
    func checkCrashLoop(_ service: ServiceRuntime, _ slot: SlotRecord) {
        guard trial(of: service)?.rollsBack(slotGeneration: slot.generation, slot.lifecycle) == true else { return }
        rollBackCrashLoop(service, slot)
    }

    private func rollBackCrashLoop(_ service: ServiceRuntime, _ slot: SlotRecord) {
        let generation = slot.generation
        service.logger.error(
            "generation \(generation) crash-loops after its switch (slot \(slot.index): \(slot.quickExits) quick exits in a row): rolling back")
        do {
            try rollBack(service)
            service.upgrade?.status.reason = "automatic: generation \(generation) crash-looped after its switch "
                + "(slot \(slot.index): \(slot.quickExits) quick exits in a row)"
        } catch {
            service.logger.error("generation \(generation) crash-loops, and cannot be rolled back: \(error)")
        }
    }

    /// Gives up an upgrade before its switch: its workers are stopped, its slots removed (no flow
    /// ever reached them), the service's definition is the old one again.
    func abandonUpgrade(_ service: ServiceRuntime, reason: String, now: Int64) {
        guard let upgrade = service.upgrade, upgrade.status.phase == .starting else { return }
        for record in upgrade.records {
            if let pid = record.pid { stopWorker(pid, now: now) }
            service.clear(record)
        }
        let removed = Set(upgrade.records.map(ObjectIdentifier.init))
        service.slots.removeAll { removed.contains(ObjectIdentifier($0)) }
        socketStore?.remove(service: service.name, listeners: service.listeners.count,
                            slots: upgrade.records.map(\.index))
        do {
            try service.plane.abandonGeneration(now: now)
        } catch {
            service.logger.error("generation \(upgrade.status.generation): cannot remove its slots: \(error)")
        }
        service.target(upgrade.previousDefinition, workers: upgrade.previousWorkers)
        upgrade.readyDeadline = nil
        upgrade.status.phase = .abandoned
        upgrade.status.reason = reason
        service.upgradeCounts.abandoned += 1
        service.pruneDefinitions()
        service.logger.error(
            "generation \(upgrade.status.generation) abandoned: \(reason); generation \(upgrade.status.previous) serves on, no flow reached the new one")
        lastEvent = "\(service.name): generation \(upgrade.status.generation) abandoned: \(reason)"
    }

    /// A worker of a generation that has not switched exited: the upgrade is abandoned (a
    /// program that cannot stay up must not take flows). True when the worker was one of those.
    func upgradeWorkerExited(_ service: ServiceRuntime, _ slot: SlotRecord, pid: pid_t, status: WaitStatus,
                             livedNs: Int64, now: Int64) -> Bool {
        guard let upgrade = service.upgrade,
              trial(of: service)?.abandons(newSlot: upgrade.records.contains { $0 === slot }) == true
        else { return false }
        abandonUpgrade(service, reason: "slot \(slot.index)'s worker pid \(pid) \(status.sentence) after "
            + "\(livedNs / 1_000_000) ms, before the switch", now: now)
        return true
    }

    /// The ready timeout of a starting generation passed.
    func upgradeTimedOut(_ service: ServiceRuntime, now: Int64) {
        if service.upgrade?.status.phase == .canary { return checkCanary(service, now: now) }
        guard let upgrade = service.upgrade, upgrade.status.phase == .starting else { return }
        let waiting = upgrade.records.filter { $0.state != .running }.map(\.index)
        let readiness = service.definitions[UInt32(upgrade.status.generation)]?.notify == true
            ? "no READY=1" : "not up ready_after_ms"
        abandonUpgrade(service, reason: "not every new worker was ready within ready_timeout_ms "
            + "(\(service.configuration.readyTimeoutMs) ms): slots \(list(waiting)) \(readiness)", now: now)
    }
}


/// "4, 5, 6".
func list(_ slots: [UInt32]) -> String { slots.map(String.init).joined(separator: ", ") }
