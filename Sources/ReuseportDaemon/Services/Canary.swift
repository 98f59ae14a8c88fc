#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportControl
import ReuseportKit
import SystemPackage

/// What went wrong with one generation's workers during a bake.
struct GenerationEvents: Equatable, CustomStringConvertible {
    /// Workers that exited within `healthy_after_ms` of their start.
    var quickExits = 0
    /// Workers killed by a signal (a crash, the watchdog's SIGABRT, a health restart's).
    var crashes = 0
    var watchdogMisses = 0
    var stalls = 0
    var healthFailures = 0
    /// Packets steered to the generation's slots, and datagrams the kernel dropped at their UDP
    /// sockets (a full receive queue): sampled with the stall check, once a second.
    var packets = 0
    var drops = 0

    static func + (a: GenerationEvents, b: GenerationEvents) -> GenerationEvents {
        GenerationEvents(quickExits: a.quickExits + b.quickExits, crashes: a.crashes + b.crashes,
                         watchdogMisses: a.watchdogMisses + b.watchdogMisses, stalls: a.stalls + b.stalls,
                         healthFailures: a.healthFailures + b.healthFailures, packets: a.packets + b.packets,
                         drops: a.drops + b.drops)
    }

    static func - (a: GenerationEvents, b: GenerationEvents) -> GenerationEvents {
        GenerationEvents(quickExits: a.quickExits - b.quickExits, crashes: a.crashes - b.crashes,
                         watchdogMisses: a.watchdogMisses - b.watchdogMisses, stalls: a.stalls - b.stalls,
                         healthFailures: a.healthFailures - b.healthFailures, packets: a.packets - b.packets,
                         drops: a.drops - b.drops)
    }

    /// Kernel drops per packet steered; 0 before any packet.
    var dropsPerPacket: Double { packets > 0 ? Double(drops) / Double(packets) : 0 }

    var kinds: [(name: String, count: Int)] {
        [("quick exits", quickExits), ("crashes by a signal", crashes), ("watchdog misses", watchdogMisses),
         ("stalls", stalls), ("health-check failures", healthFailures)]
    }

    var description: String {
        kinds.map { "\($0.count) \($0.name)" }.joined(separator: ", ") + ", \(drops) kernel drops in \(packets) packets"
    }

    /// 0.125 → "12.50".
    private static func points(_ share: Double) -> String {
        let hundredths = Int((share * 10_000).rounded())
        return "\(hundredths / 100)." + (hundredths % 100 < 10 ? "0" : "") + "\(hundredths % 100)"
    }

    /// Why the canary (`self`, on `workers` workers) is worse than the working generation
    /// (`working` on `workingWorkers`), or nil when it is not: per worker, more of any kind.
    /// Pure: the bake's decision, tested in process (CanaryDecisionTests).
    /// Then kernel drops per packet: once the canary was sent `CanarySettings.dropsMinimumPackets`,
    /// more than `CanarySettings.dropsMargin` above the working generation's is worse.
    func worse(than working: GenerationEvents, workers: Int, workingWorkers: Int, canary: UInt32,
               previous: UInt32) -> String? {
        if packets >= CanarySettings.dropsMinimumPackets,
           dropsPerPacket > working.dropsPerPacket + CanarySettings.dropsMargin
        {
            return "generation \(canary)'s sockets dropped \(drops) of \(packets) packets "
                + "(\(Self.points(dropsPerPacket))%), generation \(previous)'s \(working.drops) of \(working.packets) "
                + "(\(Self.points(working.dropsPerPacket))%): more than \(Self.points(CanarySettings.dropsMargin)) "
                + "percentage points above"
        }
        for (mine, theirs) in zip(kinds, working.kinds) where mine.count * max(workingWorkers, 1)
            > theirs.count * max(workers, 1)
        {
            return "generation \(canary) had \(mine.count) \(mine.name) on \(workers) workers, generation \(previous) "
                + "\(theirs.count) on \(workingWorkers)"
        }
        return nil
    }
}

/// The bake of one canary: when it ends, what each generation had when it began, and the gate.
final class CanaryBake {
    var settings: CanarySettings
    /// When the canary's buckets switched and the bake began, and when it ends (CLOCK_MONOTONIC).
    var endsAt: Int64?
    var nextCheck: Int64?
    /// Each slot's counters when the bake began (watchdog restarts, stalls, failed probes).
    var baseline: [UInt32: GenerationEvents] = [:]
    /// Exits seen during the bake, by generation.
    var exits: [UInt32: GenerationEvents] = [:]
    var gatePid: pid_t?
    var gateDeadline: Int64?
    /// What the last check counted, by generation (the canary's, the working one's): pinned
    /// (rp_canary) for a daemon that resumes the bake.
    var counted: [UInt32: GenerationEvents] = [:]
    /// What a previous daemon's bake had counted when it stopped (rp_canary), by generation: a
    /// resumed bake counts on from there. Its baseline is taken again at the first check that has
    /// each slot's kernel counters (`awaitsBaseline`): counters kept by the daemon (health-check
    /// failures) start from zero in a new process, the kernel's (packets, drops) carry on.
    var carried: [UInt32: GenerationEvents] = [:]
    var awaitsBaseline: Int64?
    /// A resumed bake whose record says a gate decides, while the configuration now names none:
    /// its end promotes nothing by itself (promote or roll back by hand).
    var waitsForOperator = false

    init(settings: CanarySettings) { self.settings = settings }
}

extension GenerationEvents {
    init(_ counted: PinnedCanary.Counted) {
        self.init(quickExits: counted.quickExits, crashes: counted.crashes, watchdogMisses: counted.watchdogMisses,
                  stalls: counted.stalls, healthFailures: counted.healthFailures, packets: counted.packets,
                  drops: counted.drops)
    }

    var pinned: PinnedCanary.Counted {
        PinnedCanary.Counted(quickExits: quickExits, crashes: crashes, watchdogMisses: watchdogMisses, stalls: stalls,
                             healthFailures: healthFailures, packets: packets, drops: drops)
    }
}

extension Supervisor {
    /// A slot's counters that a bake compares (exits are counted as they happen: `noteExit`).
    func events(of service: ServiceRuntime, _ slot: SlotRecord) -> GenerationEvents {
        GenerationEvents(watchdogMisses: Int(slot.watchdogRestarts), stalls: Int(slot.stalls),
                         healthFailures: healthChecks.record(service.name, slot.index)?.failed ?? 0,
                         packets: Int(clamping: slot.traffic?.packets ?? 0), drops: Int(clamping: slot.traffic?.drops ?? 0))
    }

    /// Why a reload that would give `service` the configuration `new` must wait, or nil: while
    /// a canary learns or bakes, a new worker definition, worker count or data plane would
    /// replace the canary (or the generation it is compared with) and move its flows, so the
    /// canary ends first. Other keys apply as usual.
    func reloadRefusal(_ service: ServiceRuntime, to new: ServiceConfiguration) -> String? {
        guard let upgrade = service.upgrade, upgrade.status.phase == .canary, let bake = upgrade.bake else { return nil }
        let running = service.configuration
        var changes: [String] = []
        if new.workerDefinition != running.workerDefinition { changes.append("its worker definition") }
        if new.workers != running.workers { changes.append("its workers (\(running.workers) to \(new.workers))") }
        if new.dataPlaneShape != running.dataPlaneShape { changes.append("its sockets or program") }
        guard !changes.isEmpty else { return nil }
        let status = upgrade.status
        let state: String
        if let endsAt = bake.endsAt {
            let left = (max(endsAt - MonotonicClock.nanoseconds(), 0) + 999_999_999) / 1_000_000_000
            state = "its bake ends in \(left) s"
        } else {
            state = "it learns its live flows before a bake of \(bake.settings.bakeMs) ms"
        }
        return "\(service.name): generation \(status.generation) is a canary of \(bake.settings.percent)% beside "
            + "generation \(status.previous) and \(state); the new configuration changes "
            + changes.joined(separator: " and ") + ". End the canary first (reuseportctl upgrade --promote, or "
            + "reuseportctl upgrade --rollback), then reload"
    }

    /// Starts an upgrade as a canary: `percent` and `bakeMs` override the service's settings.
    func beginCanary(_ service: ServiceRuntime, percent: Int?, bakeMs: Int?) throws -> Upgrade {
        var settings = service.configuration.canary ?? CanarySettings(percent: percent ?? 0)
        if let percent { settings.percent = percent }
        if let bakeMs { settings.bakeMs = bakeMs }
        guard CanaryPlacement.percentRange.contains(settings.percent) else {
            throw DaemonError.upgrade("a canary needs a percent of the buckets: --canary PERCENT, or canary_percent")
        }
        let upgrade = try beginUpgrade(service)
        upgrade.bake = CanaryBake(settings: settings)
        upgrade.status.canaryPercent = settings.percent
        upgrade.status.bakeMs = settings.bakeMs
        return upgrade
    }

    /// Every new worker is ready: the canary's buckets learn their live flows, then switch.
    func startCanary(_ service: ServiceRuntime, _ upgrade: Upgrade, _ bake: CanaryBake, now: Int64) {
        guard let plan = beginReadyChange(service, upgrade, phase: .canary, what: "the canary", now: now, {
            try service.plane.startCanary(percent: bake.settings.percent, now: now)
        }) else { return }
        upgrade.status.canaryBuckets = plan.movingBuckets
        bake.nextCheck = now
        let learnMs = max(plan.switchNs - now, 0) / 1_000_000
        service.logger.notice(
            "generation \(upgrade.status.generation): all \(upgrade.records.count) workers ready; a canary of \(bake.settings.percent)%: \(plan.movingBuckets) of \(plan.bucketCount) buckets learn their live flows for \(learnMs) ms, then send new flows to it for a bake of \(bake.settings.bakeMs) ms")
        changed(service, event: "generation \(upgrade.status.generation) is a canary", now: now)
    }

    /// Every new worker of `upgrade` is ready: `operation` begins its change (the switch, or a
    /// canary), and it no longer waits for readiness; if the change cannot begin, it is abandoned.
    func beginReadyChange(_ service: ServiceRuntime, _ upgrade: Upgrade, phase: UpgradeStatus.Phase, what: String,
                          now: Int64, _ operation: () throws -> TransitionPlan) -> TransitionPlan? {
        let plan: TransitionPlan
        do {
            plan = try operation()
        } catch {
            abandonUpgrade(service, reason: "\(what) could not begin: \(error)", now: now)
            return nil
        }
        upgrade.readyDeadline = nil
        upgrade.status.phase = phase
        upgrade.status.readyNs = upgrade.records.compactMap(\.readySinceNs).max()
        upgrade.status.learningNs = WallClock.nanoseconds()
        return plan
    }

    /// A canary's change began: said in `status`'s last event, and checked at once.
    private func changed(_ service: ServiceRuntime, event: String, now: Int64) {
        lastEvent = "\(service.name): \(event)"
        service.nextTransitionCheck = now
        checkTransition(service, now: now)
    }

    /// The bake's check: once the canary's buckets switched the bake begins; a canary worse
    /// than the working generation is rolled back; at the end of the bake the gate (if any)
    /// decides, and a canary that passed is promoted.
    func checkCanary(_ service: ServiceRuntime, now: Int64) {
        guard let upgrade = service.upgrade, upgrade.status.phase == .canary, let bake = upgrade.bake else { return }
        bake.nextCheck = now + CanarySettings.checkIntervalNs
        let plane = service.plane
        guard plane.model.canary?.switched == true else { return }
        let canary = UInt32(upgrade.status.generation)
        let previous = UInt32(upgrade.status.previous)
        if let since = bake.awaitsBaseline {
            // A resumed bake: its baseline is each slot's counters once the stall check sampled
            // its sockets (at most a few seconds after the start).
            let sampled = service.slots.allSatisfy { $0.traffic != nil || ![canary, previous].contains($0.generation) }
            guard sampled || now - since >= 5_000_000_000 else { return }
            for slot in service.slots { bake.baseline[slot.index] = events(of: service, slot) }
            bake.awaitsBaseline = nil
        }
        if bake.endsAt == nil {
            bake.endsAt = now + bake.settings.bakeMs.msAsNs
            upgrade.status.bakeEndsNs = WallClock.nanoseconds() + UInt64(bake.settings.bakeMs) * 1_000_000
            for slot in service.slots { bake.baseline[slot.index] = events(of: service, slot) }
            service.logger.notice(
                "generation \(canary): the canary takes the new flows of \(upgrade.status.canaryBuckets ?? 0) buckets; the bake ends in \(bake.settings.bakeMs) ms")
        }
        func sum(_ generation: UInt32) -> (GenerationEvents, Int) {
            let slots = service.slots.filter { $0.generation == generation && !plane.leaving.contains($0.index) }
            let start = (bake.carried[generation] ?? GenerationEvents())
                + (bake.exits[generation] ?? GenerationEvents())
            let counted = slots.reduce(start) {
                $0 + (events(of: service, $1) - (bake.baseline[$1.index] ?? GenerationEvents()))
            }
            return (counted, slots.count)
        }
        let (mine, workers) = sum(canary)
        let (theirs, workingWorkers) = sum(previous)
        bake.counted = [canary: mine, previous: theirs]
        upgrade.status.comparison = "generation \(canary): \(mine); generation \(previous): \(theirs)"
        upgrade.status.bakeTraffic = [(canary, mine), (previous, theirs)].map {
            BakeTraffic(generation: Int($0.0), packets: UInt64(max($0.1.packets, 0)), drops: UInt64(max($0.1.drops, 0)))
        }
        if let reason = mine.worse(than: theirs, workers: workers, workingWorkers: workingWorkers, canary: canary,
                                   previous: previous) {
            return rollBackCanaryQuietly(service, reason: "automatic, during the bake: \(reason)")
        }
        guard let endsAt = bake.endsAt, now >= endsAt, !bake.waitsForOperator else { return }
        guard let gate = bake.settings.gate else {
            return promoteCanary(service, reason: "the bake of \(bake.settings.bakeMs) ms passed: \(mine)")
        }
        if let pid = bake.gatePid {
            if let deadline = bake.gateDeadline, now >= deadline {
                signal(pid, SIGKILL)
                bake.gateDeadline = nil
            }
            return
        }
        do {
            bake.gatePid = try spawnGate(service, gate)
            bake.gateDeadline = now + CanarySettings.gateTimeoutMs.msAsNs
            service.logger.notice("generation \(canary): the bake passed; the gate decides: \(gate.joined(separator: " "))")
        } catch {
            rollBackCanaryQuietly(service, reason: "the gate \(gate[0]) could not start: \(error)")
        }
    }

    /// Runs the gate as the service's user (through exec-worker, as a worker is started), its
    /// output logged as a worker's.
    private func spawnGate(_ service: ServiceRuntime, _ gate: [String]) throws -> pid_t {
        var configuration = service.configuration
        configuration.program = .exec(gate)
        let (output, writeEnd) = try WorkerOutput.pipe(logger: service.logger, drops: OutputDrops())
        let pid = try withExtendedLifetime(writeEnd) {
            try WorkerSpawn(executable: executable, arguments: workerArguments(configuration),
                            environment: ["PATH=/usr/local/bin:/usr/bin:/bin", "REUSEPORT_SERVICE=\(service.name)"],
                            sockets: [], output: writeEnd.fd).start()
        }
        output.pid = pid
        registerOutput(output)
        return pid
    }

    /// A child exited: if it was a canary's gate, its status decides. True when it was.
    func gateExited(_ pid: pid_t, status: WaitStatus?) -> Bool {
        guard let service = services.first(where: { $0.upgrade?.bake?.gatePid == pid }),
              let bake = service.upgrade?.bake
        else { return false }
        bake.gatePid = nil
        bake.gateDeadline = nil
        let gate = bake.settings.gate?.joined(separator: " ") ?? "the gate"
        if case .exited(0) = status {
            promoteCanary(service, reason: "the bake passed and the gate (\(gate)) exited with status 0")
        } else {
            rollBackCanaryQuietly(service, reason: "the gate (\(gate)) \(status?.sentence ?? "ended") after the bake")
        }
        return true
    }

    /// What `service`'s canary pins for a later daemon (rp_canary): derived from the upgrade's
    /// bake and the placement's canary; nil when no canary learns or bakes.
    func canaryRecord(of service: ServiceRuntime) -> PinnedCanary? {
        guard let upgrade = service.upgrade, upgrade.status.phase == .canary, let bake = upgrade.bake,
              let placement = service.plane.model.canary
        else { return nil }
        let canary = UInt32(upgrade.status.generation), previous = UInt32(upgrade.status.previous)
        let phase: PinnedCanary.Phase = !placement.switched ? .learning : bake.gatePid != nil ? .gate : .baking
        return PinnedCanary(
            phase: phase, generation: canary, previous: previous, percent: bake.settings.percent,
            bakeMs: bake.settings.bakeMs, bakeEndsNs: placement.switched ? bake.endsAt : nil,
            bakeEndsWallNs: placement.switched && bake.endsAt != nil ? upgrade.status.bakeEndsNs : nil,
            gated: bake.settings.gate != nil || bake.waitsForOperator,
            counted: ((bake.counted[canary] ?? bake.carried[canary] ?? GenerationEvents()).pinned,
                      (bake.counted[previous] ?? bake.carried[previous] ?? GenerationEvents()).pinned),
            original: placement.original)
    }

    /// Writes every service's canary to its rp_canary, at every turn of the loop: what changed
    /// only (a step of the canary, or a check's counts, at most every 250 ms).
    func publishCanaries() {
        for service in services where service.pinned {
            do {
                try service.canaryRecords?.publish(canaryRecord(of: service))
            } catch {
                service.logger.error("cannot write the canary to \(RP_MAP_CANARY): \(error)")
            }
        }
    }

    /// Takes over the canary a previous daemon pinned (rp_canary) once the plane resumed its
    /// placement (its slots, its buckets): the upgrade is a canary again, its adopted workers the
    /// canary's, and the bake goes on with the time it had left (CLOCK_MONOTONIC: the same clock
    /// in every process of a boot) and what it had counted. A gate that was running when the
    /// previous daemon stopped is run again once this one's first check finds the bake over (the
    /// gate's run was lost with the daemon that waited for it; a gate is a check, run twice it
    /// decides once). The gate is the configuration's; a record that says a gate decides, met by
    /// a configuration that names none, leaves the decision to `upgrade --promote` or
    /// `--rollback`.
    func resumeCanary(of service: ServiceRuntime) {
        guard let record = service.takeInheritedCanary(), let placement = service.plane.model.canary,
              placement.generation == record.generation
        else { return }
        let now = MonotonicClock.nanoseconds()
        let wall = WallClock.nanoseconds()
        var settings = service.configuration.canary ?? CanarySettings(percent: record.percent)
        settings.percent = record.percent
        settings.bakeMs = record.bakeMs
        if !record.gated { settings.gate = nil }
        let records = service.slots.filter { $0.generation == record.generation }
        var status = UpgradeStatus(generation: Int(record.generation), previous: Int(record.previous), phase: .canary,
                                   slots: records.map(\.index), startedNs: wall,
                                   readyNs: wall, learningNs: wall)
        status.canaryPercent = record.percent
        status.bakeMs = record.bakeMs
        status.canaryBuckets = placement.buckets.count
        let upgrade = Upgrade(status: status, records: records, readyDeadline: nil,
                              previousDefinition: service.configuration.workerDefinition,
                              previousWorkers: service.configuration.workers)
        let bake = CanaryBake(settings: settings)
        bake.waitsForOperator = record.gated && settings.gate == nil
        bake.carried = [record.generation: GenerationEvents(record.counted.canary),
                        record.previous: GenerationEvents(record.counted.working)]
        bake.nextCheck = now
        let state: String
        if placement.switched, let endsAt = record.bakeEndsNs {
            bake.endsAt = endsAt
            bake.awaitsBaseline = now
            upgrade.status.bakeEndsNs = wall + UInt64(max(endsAt - now, 0))
            let left = max(endsAt - now, 0) / 1_000_000
            state = left > 0 ? "its bake ends in \(left) ms" : (record.phase == .gate && settings.gate != nil
                ? "its bake was over and the gate running: the gate runs again" : "its bake is over")
        } else if placement.switched {
            bake.awaitsBaseline = now
            state = "its bake of \(record.bakeMs) ms begins now"
        } else {
            state = "its buckets learn their live flows, then its bake of \(record.bakeMs) ms begins"
        }
        upgrade.bake = bake
        service.upgrade = upgrade
        let gate = bake.waitsForOperator
            ? "; the records say a gate decides but the configuration names none: it waits for upgrade --promote or --rollback"
            : settings.gate.map { "; the gate decides at its end: \($0.joined(separator: " "))" } ?? ""
        service.logger.notice(
            "generation \(record.generation): resumed the canary of \(record.percent)% left in the pins (\(placement.buckets.count) buckets, slots \(list(records.map(\.index))), beside generation \(record.previous)); \(state)\(gate); counted so far: \(GenerationEvents(record.counted.canary)) against \(GenerationEvents(record.counted.working))")
        lastEvent = "\(service.name): generation \(record.generation)'s canary resumed"
        service.nextTransitionCheck = now
    }

    /// Counts a worker's exit towards its generation's bake.
    func noteExit(_ service: ServiceRuntime, _ slot: SlotRecord, status: WaitStatus, livedNs: Int64) {
        guard let bake = service.upgrade?.bake, bake.endsAt != nil, service.upgrade?.status.phase == .canary else { return }
        var events = bake.exits[slot.generation] ?? GenerationEvents()
        if livedNs < service.configuration.restart.healthyAfterMs.msAsNs { events.quickExits += 1 }
        if case .killed = status { events.crashes += 1 }
        bake.exits[slot.generation] = events
    }

    /// Promotes the canary: every bucket switches to its generation as a change that keeps live
    /// flows (only the buckets it does not hold yet move); then it works as after any upgrade.
    func promoteCanary(_ service: ServiceRuntime, reason: String) {
        guard let upgrade = service.upgrade, upgrade.status.phase == .canary else { return }
        let now = MonotonicClock.nanoseconds()
        let plan: TransitionPlan
        do {
            plan = try service.plane.switchGeneration(now: now)
        } catch {
            service.logger.error("generation \(upgrade.status.generation): the canary cannot be promoted yet: \(error)")
            return
        }
        upgrade.status.phase = .learning
        upgrade.status.reason = "promoted: \(reason)"
        service.logger.notice(
            "generation \(upgrade.status.generation) promoted (\(reason)): the other \(plan.movingBuckets) buckets learn their live flows for \(max(plan.switchNs - now, 0) / 1_000_000) ms, then switch")
        changed(service, event: "generation \(upgrade.status.generation) promoted", now: now)
    }

    /// Rolls the canary back: its buckets learn its live flows and go back to the working
    /// generation, whose definition the service has again; the canary's slots leave and retire
    /// once their flows are idle, or at drain_timeout_ms.
    func rollBackCanary(_ service: ServiceRuntime, reason: String) throws {
        guard let upgrade = service.upgrade, upgrade.status.phase == .canary else {
            throw DaemonError.upgrade("\(service.name) has no canary baking")
        }
        let now = MonotonicClock.nanoseconds()
        let generation = upgrade.status.generation
        let plan = try service.plane.rollBackCanary(now: now)
        if let pid = upgrade.bake?.gatePid { signal(pid, SIGKILL) }
        upgrade.status.phase = .rolledBack
        service.target(upgrade.previousDefinition, workers: upgrade.previousWorkers)
        service.upgradeCounts.abandoned += 1
        let tracking = service.configuration.tracking
        let flows = service.plane.tracksFlows
            ? "its live flows stay on it until idle (\(tracking.idleTimeoutMs) ms without a packet), at most drain_timeout_ms ("
                + (tracking.drainTimeoutMs > 0 ? "\(tracking.drainTimeoutMs) ms" : "no limit") + ")"
            : "without flow tracking its live flows move at once"
        upgrade.status.reason = "\(reason); \(flows)"
        service.logger.error(
            "generation \(generation)'s canary rolled back: \(reason); its \(plan.movingBuckets) buckets go back to generation \(upgrade.status.previous) after \(max(plan.switchNs - now, 0) / 1_000_000) ms; \(flows)")
        changed(service, event: "generation \(generation)'s canary rolled back: \(reason)", now: now)
    }

    private func rollBackCanaryQuietly(_ service: ServiceRuntime, reason: String) {
        do {
            try rollBackCanary(service, reason: reason)
        } catch {
            service.logger.error("the canary cannot be rolled back now (\(error)); retried at the next check")
        }
    }
}
