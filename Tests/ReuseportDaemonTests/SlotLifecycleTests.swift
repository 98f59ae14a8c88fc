import Glibc
import ReuseportControl
import ReuseportDaemon
import ReuseportKit
import Testing

/// Each restart rule of `SlotLifecycle`, in process with an injected clock and a seeded random
/// source: no daemon, no process, no root.
struct SlotLifecycleTests {
    static let policy = RestartPolicy(backoffMinimumMs: 100, backoffMaximumMs: 10_000, healthyAfterMs: 10_000,
                                      readyAfterMs: 500)
    static let ms: Int64 = 1_000_000

    /// A slot whose worker started at `startedAt` exits at `now`; returns the decision.
    static func exit(_ slot: inout SlotLifecycle, at now: Int64, status: WaitStatus?, onTrial: Bool = false,
                     stopping: Bool = false, another: Bool = false, rescue: inout RescueBudget,
                     seed: UInt64 = 1) -> RestartDecision {
        var random = SeededRandom(seed: seed)
        let lived = slot.workerExited(now: now)
        return slot.afterExit(livedNs: lived, status: status, now: now, policy: policy, onTrial: onTrial,
                              stopping: stopping, anotherSlotHasWorker: another, rescue: &rescue, random: &random)
    }

    @Test func aHealthyRunRestartsAtOnceAndResetsTheCount() {
        var slot = SlotLifecycle(startedAt: 0, quickExits: 5)
        var rescue = RescueBudget()
        #expect(Self.exit(&slot, at: 10_000 * Self.ms, status: .exited(1), rescue: &rescue) == .startNow(rescue: nil))
        #expect(slot.quickExits == 1)
        #expect(slot.startedAt == nil)
        #expect(slot.downSince == 10_000 * Self.ms)
    }

    /// The first quick exit restarts at once (a worker killed once loses no time); each further
    /// one doubles the wait, from the minimum to the maximum; the jitter adds at most a quarter
    /// and never takes anything off.
    @Test func quickExitsDoubleTheBackOffWithinItsBoundsAndJitter() {
        for seed in UInt64(1)...200 {
            var slot = SlotLifecycle()
            var rescue = RescueBudget()
            var now: Int64 = 0
            var waits: [Int] = []
            slot.started(now: now)
            now += 50 * Self.ms
            let first = Self.exit(&slot, at: now, status: .exited(1), rescue: &rescue, seed: seed)
            #expect(first == .startNow(rescue: nil))
            for _ in 0..<11 {
                slot.started(now: now)
                now += 50 * Self.ms
                guard case .startAt(let at, let delay) = Self.exit(&slot, at: now, status: .exited(1),
                                                                  rescue: &rescue, seed: seed)
                else { Issue.record("a quick exit must back off"); return }
                #expect(at == now + Int64(delay) * Self.ms)
                #expect(slot.nextStartAt == at)
                #expect(slot.startDeadline(hasWorker: false, stopping: false) == at)
                waits.append(delay)
                now = at
            }
            for (exits, wait) in zip(1..., waits) {
                // After `exits` quick exits before this one.
                let base = Self.policy.delayMs(afterQuickExits: exits)
                #expect(base == min(10_000, 100 << (exits - 1)))
                #expect((base...(base + base / 4)).contains(wait), "exit \(exits): \(wait) ms, base \(base)")
            }
            #expect(slot.quickExits == 12)
            #expect(waits.last.map { (10_000...12_500).contains($0) } == true)
            #expect(slot.crashLoops)
        }
    }

    @Test func jitterSpreadsOverItsWholeRange() {
        var seen = Set<Int>()
        var random = SeededRandom(seed: 7)
        for _ in 0..<2_000 { seen.insert(RestartPolicy.jittered(100, using: &random)) }
        #expect(seen == Set(100...125))
    }

    /// A signal that kills a ready worker is not a quick exit: restarted at once, the count starts over.
    @Test func aSignalAfterReadyRestartsAtOnce() {
        var slot = SlotLifecycle(startedAt: 0, quickExits: 2)
        var rescue = RescueBudget()
        #expect(Self.exit(&slot, at: 600 * Self.ms, status: .killed(signal: SIGKILL), another: true, rescue: &rescue)
            == .startNow(rescue: nil))
        #expect(slot.quickExits == 0)
    }

    /// On trial (a new generation baking or learning), a signal after READY is a crash: it
    /// counts, backs off from the second, and three in a row are a crash loop (the rollback).
    /// Every other slot dark changes nothing: a generation on trial is never rescued.
    @Test func aSignalAfterReadyOnTrialCountsTowardsTheRollback() {
        var slot = SlotLifecycle()
        var rescue = RescueBudget(lastReadyAt: 0)
        var now: Int64 = 0
        for exits in 1...3 {
            slot.started(now: now)
            now += 600 * Self.ms
            let decision = Self.exit(&slot, at: now, status: .killed(signal: SIGSEGV), onTrial: true, rescue: &rescue)
            #expect(slot.quickExits == exits)
            #expect(slot.crashLoops == (exits == 3))
            if exits == 1 {
                #expect(decision == .startNow(rescue: nil))
            } else {
                guard case .startAt(let at, _) = decision else { Issue.record("\(decision)"); return }
                now = at
            }
        }
        #expect(rescue.starts == 0)
    }

    /// Every other slot dark, a signal death backs off no more if a worker became ready since
    /// the last rescue; once per ready worker.
    @Test func theRescueStartIsOncePerReadyWorker() {
        var rescue = RescueBudget()
        var slot = SlotLifecycle(startedAt: 0, quickExits: 1)
        // No worker of the service was ever ready: a program that cannot start backs off.
        if case .startAt = Self.exit(&slot, at: 100 * Self.ms, status: .killed(signal: SIGKILL), rescue: &rescue) {
        } else { Issue.record("no rescue without a ready worker") }
        slot.started(now: 200 * Self.ms)
        slot.ready(now: 300 * Self.ms, rescue: &rescue)
        #expect(slot.downSince == nil)
        let rescued = Self.exit(&slot, at: 400 * Self.ms, status: .killed(signal: SIGKILL), rescue: &rescue)
        #expect(rescued == .startNow(rescue: (1, 200)))
        #expect(rescue.starts == 1 && rescue.lastRescueAt == 400 * Self.ms)
        slot.started(now: 400 * Self.ms)
        // Dies again before it is ready: no second rescue.
        if case .startAt = Self.exit(&slot, at: 450 * Self.ms, status: .killed(signal: SIGKILL), rescue: &rescue) {
        } else { Issue.record("a second rescue without a ready worker since") }
        // Another slot has a worker: no rescue either.
        slot.started(now: 500 * Self.ms)
        slot.ready(now: 600 * Self.ms, rescue: &rescue)
        if case .startAt = Self.exit(&slot, at: 700 * Self.ms, status: .killed(signal: SIGKILL), another: true,
                                     rescue: &rescue) {
        } else { Issue.record("rescued while another slot has a worker") }
        // An exit by itself is not rescued: the program says it cannot run.
        slot.started(now: 800 * Self.ms)
        slot.ready(now: 900 * Self.ms, rescue: &rescue)
        if case .startAt = Self.exit(&slot, at: 950 * Self.ms, status: .exited(1), rescue: &rescue) {
        } else { Issue.record("an exit by itself was rescued") }
        #expect(rescue.starts == 1)
    }

    @Test func stoppingStartsNothingButStillCounts() {
        var slot = SlotLifecycle(startedAt: 0)
        var rescue = RescueBudget(lastReadyAt: 0)
        #expect(Self.exit(&slot, at: 10 * Self.ms, status: .exited(0), stopping: true, rescue: &rescue) == .none)
        #expect(slot.quickExits == 1 && slot.nextStartAt == nil)
        #expect(slot.startDeadline(hasWorker: false, stopping: true) == nil)
    }

    /// The failover timer runs from the first exit, survives restarts that do not become ready,
    /// stops once the slot is failed over, and a ready worker ends it (the restore).
    @Test func failoverAfterTheSlotIsDownLongEnoughAndRestoreWhenReady() {
        var slot = SlotLifecycle(startedAt: 0)
        var rescue = RescueBudget()
        _ = Self.exit(&slot, at: 1_000 * Self.ms, status: .exited(1), rescue: &rescue)
        #expect(slot.failoverDeadline(failoverAfterMs: 2_000, failedOver: false, stopping: false) == 3_000 * Self.ms)
        slot.started(now: 1_200 * Self.ms)
        _ = Self.exit(&slot, at: 1_300 * Self.ms, status: .exited(1), rescue: &rescue)
        #expect(slot.downSince == 1_000 * Self.ms)
        #expect(slot.failoverDeadline(failoverAfterMs: 2_000, failedOver: true, stopping: false) == nil)
        #expect(slot.failoverDeadline(failoverAfterMs: 2_000, failedOver: false, stopping: true) == nil)
        slot.failoverNotWritten(now: 3_000 * Self.ms)
        #expect(slot.failoverDeadline(failoverAfterMs: 2_000, failedOver: false, stopping: false) == 5_000 * Self.ms)
        slot.started(now: 3_100 * Self.ms)
        #expect(slot.readyDeadline(waitsForReady: true, policy: Self.policy) == 3_600 * Self.ms)
        #expect(slot.readyDeadline(waitsForReady: false, policy: Self.policy) == nil)
        slot.ready(now: 3_600 * Self.ms, rescue: &rescue)
        #expect(slot.downSince == nil)
        #expect(slot.failoverDeadline(failoverAfterMs: 2_000, failedOver: false, stopping: false) == nil)
        #expect(rescue.lastReadyAt == 3_600 * Self.ms)
    }

    /// A worker that could not be spawned (no status, lived 0) is a quick exit: tried again at
    /// once, then backs off, and is never rescued.
    @Test func aSpawnFailureBacksOff() {
        var slot = SlotLifecycle()
        var rescue = RescueBudget(lastReadyAt: 0)
        var random = SeededRandom(seed: 3)
        func spawnFailed() -> RestartDecision {
            slot.afterExit(livedNs: 0, status: nil, now: 0, policy: Self.policy, onTrial: false,
                           stopping: false, anotherSlotHasWorker: false, rescue: &rescue, random: &random)
        }
        #expect(spawnFailed() == .startNow(rescue: nil))
        let decision = spawnFailed()
        guard case .startAt(let at, let delay) = decision else { Issue.record("\(decision)"); return }
        #expect((100...125).contains(delay) && at == Int64(delay) * Self.ms)
        #expect(slot.quickExits == 2 && slot.downSince == 0 && rescue.starts == 0)
    }

    /// The watchdog runs from the start, `WATCHDOG=1` pushes it back, `WATCHDOG=trigger` makes it
    /// due now; once it fired it is off until the next start, and a slot without a worker has none.
    @Test func theWatchdogIsFedFiresOnceAndRestartsWithTheWorker() {
        var slot = SlotLifecycle()
        slot.started(now: 0, watchdogMs: 1_000)
        #expect(slot.watchdogTimer(hasWorker: true, stopping: false, watchdogMs: 1_000) == 1_000 * Self.ms)
        slot.watchdogNotified(now: 800 * Self.ms, watchdogMs: 1_000)
        #expect(slot.watchdogTimer(hasWorker: true, stopping: false, watchdogMs: 1_000) == 1_800 * Self.ms)
        #expect(slot.watchdogTimer(hasWorker: false, stopping: false, watchdogMs: 1_000) == nil)
        #expect(slot.watchdogTimer(hasWorker: true, stopping: true, watchdogMs: 1_000) == nil)
        slot.watchdogNotified(now: 900 * Self.ms, watchdogMs: 0, trigger: true)
        #expect(slot.watchdogDeadline == 900 * Self.ms)
        let abort = slot.watchdogExpired(hasWorker: true)
        #expect(abort)
        #expect(slot.watchdogDeadline == nil)
        // Fed after it fired: stays off (the worker is being stopped).
        slot.watchdogNotified(now: 950 * Self.ms, watchdogMs: 1_000)
        #expect(slot.watchdogDeadline == nil)
        let abortNone = slot.watchdogExpired(hasWorker: false)
        #expect(!abortNone)
        slot.started(now: 2_000 * Self.ms, watchdogMs: 1_000)
        #expect(slot.watchdogDeadline == 3_000 * Self.ms)
        slot.started(now: 4_000 * Self.ms, watchdogMs: 0)
        #expect(slot.watchdogDeadline == nil)
    }

    /// A running slot is stalled after `samplesToMark` full samples with growing drops, a
    /// stalled one runs again once drained; no other state changes.
    @Test func theStallMarkingNeedsSamplesInARowAndADrainedQueue() {
        #expect(StallVerdict(state: .running, fullWithGrowingDrops: 1, drained: false, samplesToMark: 2) == .unchanged)
        #expect(StallVerdict(state: .running, fullWithGrowingDrops: 2, drained: false, samplesToMark: 2) == .stalled)
        #expect(StallVerdict(state: .starting, fullWithGrowingDrops: 5, drained: false, samplesToMark: 2) == .unchanged)
        #expect(StallVerdict(state: .failedOver, fullWithGrowingDrops: 5, drained: false, samplesToMark: 2) == .unchanged)
        #expect(StallVerdict(state: .stalled, fullWithGrowingDrops: 3, drained: false, samplesToMark: 2) == .unchanged)
        #expect(StallVerdict(state: .stalled, fullWithGrowingDrops: 0, drained: true, samplesToMark: 2) == .runningAgain)
        #expect(StallVerdict(state: .running, fullWithGrowingDrops: 0, drained: true, samplesToMark: 2) == .unchanged)
    }

    /// A new generation is on trial from its learning until its predecessor is gone, never in a
    /// rollback; an exit before the switch abandons it; a crash loop after the switch rolls it back.
    @Test func theNewGenerationIsOnTrialUntilItsPredecessorIsGone() {
        func trial(_ phase: UpgradeStatus.Phase, rollback: Bool = false, previousHasSlots: Bool = true)
            -> GenerationTrial
        {
            GenerationTrial(phase: phase, isRollback: rollback, generation: 2, previous: 1,
                            previousHasSlots: previousHasSlots)
        }
        #expect(trial(.learning).isOnTrial(slotGeneration: 2))
        #expect(trial(.switched).isOnTrial(slotGeneration: 2))
        #expect(!trial(.switched).isOnTrial(slotGeneration: 1))
        #expect(!trial(.switched, previousHasSlots: false).isOnTrial(slotGeneration: 2))
        #expect(!trial(.switched, rollback: true).isOnTrial(slotGeneration: 2))
        for phase in [UpgradeStatus.Phase.starting, .abandoned, .canary] {
            #expect(!trial(phase).isOnTrial(slotGeneration: 2), "\(phase)")
        }
        #expect(trial(.starting).abandons(newSlot: true))
        #expect(!trial(.starting).abandons(newSlot: false))
        #expect(!trial(.learning).abandons(newSlot: true))
        let looping = SlotLifecycle(quickExits: SlotLifecycle.crashLoopExits)
        let twice = SlotLifecycle(quickExits: SlotLifecycle.crashLoopExits - 1)
        #expect(trial(.switched).rollsBack(slotGeneration: 2, looping))
        #expect(!trial(.switched).rollsBack(slotGeneration: 2, twice))
        #expect(!trial(.switched).rollsBack(slotGeneration: 1, looping))
        #expect(!trial(.learning).rollsBack(slotGeneration: 2, looping))
        #expect(!trial(.switched, rollback: true).rollsBack(slotGeneration: 2, looping))
    }

    /// A ready worker of the new generation killed by SIGSEGV three times in a row after the
    /// switch: each death counts (on trial), and the third rolls the generation back.
    @Test func signalDeathsAfterReadyOnTrialRollTheSwitchedGenerationBack() {
        let switched = GenerationTrial(phase: .switched, isRollback: false, generation: 2, previous: 1,
                                       previousHasSlots: true)
        var slot = SlotLifecycle()
        var rescue = RescueBudget(lastReadyAt: 0)
        var now: Int64 = 0
        var rolledBackAt: Int?
        for death in 1...3 {
            slot.started(now: now)
            slot.ready(now: now + 500 * Self.ms, rescue: &rescue)
            now += 2_000 * Self.ms
            let decision = Self.exit(&slot, at: now, status: .killed(signal: SIGSEGV),
                                     onTrial: switched.isOnTrial(slotGeneration: 2), rescue: &rescue)
            if switched.rollsBack(slotGeneration: 2, slot), rolledBackAt == nil { rolledBackAt = death }
            if case .startAt(let at, _) = decision { now = at }
        }
        #expect(rolledBackAt == 3)
        #expect(rescue.starts == 0)
    }
}
