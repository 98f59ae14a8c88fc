import ReuseportControl
import ReuseportKit

/// One slot's worker lifecycle as a value: when its worker started, since when the slot has had
/// no ready worker, its quick exits in a row, and when its next worker starts. The restart
/// decisions (back-off with jitter, quick exits, the rescue start, the crash loop) are pure
/// functions of it, with `now` and the random source of the jitter as parameters, so they are
/// tested in process with an injected clock (SlotLifecycleTests, SlotLifecyclePropertyTests).
/// `Supervisor` carries out what they return: the spawn, the timer, the worker state, the log.
///
/// It sits beside `Supervisor` rather than in ReuseportKit because its policy (`RestartPolicy`)
/// is the daemon's configuration; the placement's value (`PlacementModel`) is the data plane's.
public struct SlotLifecycle: Equatable, Sendable {
    /// When the current worker started (CLOCK_MONOTONIC); nil while the slot has none.
    public var startedAt: Int64?
    /// Since when the slot has had no ready worker; nil while one is ready, and before the first
    /// exit (a slot whose first worker is starting is not down).
    public var downSince: Int64?
    /// In back-off: when the next worker starts.
    public var nextStartAt: Int64?
    /// Exits in a row of workers that did not live `healthyAfterMs`.
    public var quickExits = 0
    /// When the current worker's watchdog expires (`watchdog_ms` after its start or its last
    /// `WATCHDOG=1`); nil without a watchdog, or once it fired.
    public var watchdogDeadline: Int64?

    public init(startedAt: Int64? = nil, downSince: Int64? = nil, nextStartAt: Int64? = nil, quickExits: Int = 0,
                watchdogDeadline: Int64? = nil) {
        self.startedAt = startedAt
        self.downSince = downSince
        self.nextStartAt = nextStartAt
        self.quickExits = quickExits
        self.watchdogDeadline = watchdogDeadline
    }

    /// Quick exits in a row of one slot of a generation that switched, while the one before it
    /// still drains, that roll it back (`Supervisor.checkCrashLoop`).
    public static let crashLoopExits = 3

    /// `crashLoopExits` quick exits in a row.
    public var crashLoops: Bool { quickExits >= Self.crashLoopExits }
}

/// A service's rescue starts: a worker started at once, instead of after its back-off, because
/// every other slot of the service was down. Each needs a worker of the service to have become
/// ready since the last: a program that cannot start never becomes ready, so it still backs off.
public struct RescueBudget: Equatable, Sendable {
    /// When a worker of the service last became ready (or was adopted): proof its program starts.
    public var lastReadyAt: Int64?
    /// When the last rescue start happened.
    public var lastRescueAt: Int64?
    /// Rescue starts since the daemon started.
    public var starts = 0

    public init(lastReadyAt: Int64? = nil, lastRescueAt: Int64? = nil, starts: Int = 0) {
        self.lastReadyAt = lastReadyAt
        self.lastRescueAt = lastRescueAt
        self.starts = starts
    }

    /// A ready worker since the last rescue.
    public var allowsRescue: Bool {
        guard let ready = lastReadyAt else { return false }
        return ready > (lastRescueAt ?? Int64.min)
    }
}

/// What the supervisor does after a slot's worker exited or could not be spawned.
public enum RestartDecision: Equatable, Sendable {
    /// The daemon is stopping: nothing starts.
    case none
    /// Start a worker now. `rescue`: this is the service's rescue start number `count`, instead
    /// of a back-off of `insteadOfMs`.
    case startNow(rescue: (count: Int, insteadOfMs: Int)?)
    /// Start a worker at `at` (CLOCK_MONOTONIC), `delayMs` (jittered) after the exit.
    case startAt(Int64, delayMs: Int)

    public static func == (a: RestartDecision, b: RestartDecision) -> Bool {
        switch (a, b) {
        case (.none, .none): return true
        case (.startNow(let x), .startNow(let y)): return x?.count == y?.count && x?.insteadOfMs == y?.insteadOfMs
        case (.startAt(let x, let dx), .startAt(let y, let dy)): return x == y && dx == dy
        default: return false
        }
    }
}

extension SlotLifecycle {
    /// A worker started on the slot (or was adopted) at `now`; `watchdogMs` 0: no watchdog.
    public mutating func started(now: Int64, watchdogMs: Int = 0) {
        nextStartAt = nil
        startedAt = now
        watchdogDeadline = watchdogMs > 0 ? now + Int64(watchdogMs) * 1_000_000 : nil
    }

    /// The worker sent `WATCHDOG=1` (`trigger`: `WATCHDOG=trigger`, which expires it now). A
    /// watchdog that fired stays off until the next start.
    public mutating func watchdogNotified(now: Int64, watchdogMs: Int, trigger: Bool = false) {
        guard watchdogDeadline != nil else { return }
        if watchdogMs > 0 { watchdogDeadline = now + Int64(watchdogMs) * 1_000_000 }
        if trigger { watchdogDeadline = now }
    }

    /// The watchdog timer: due while the slot has a worker and the daemon does not stop.
    public func watchdogTimer(hasWorker: Bool, stopping: Bool, watchdogMs: Int) -> Int64? {
        hasWorker && !stopping && watchdogMs > 0 ? watchdogDeadline : nil
    }

    /// The watchdog fired: it is off until the next start. True when the worker is to be
    /// stopped with SIGABRT and the miss counted (the slot has a worker).
    public mutating func watchdogExpired(hasWorker: Bool) -> Bool {
        watchdogDeadline = nil
        return hasWorker
    }

    /// The slot's worker became ready at `now` (lived `readyAfterMs`, or sent READY=1): the slot
    /// is up, and the service may be rescued once more.
    public mutating func ready(now: Int64, rescue: inout RescueBudget) {
        downSince = nil
        rescue.lastReadyAt = now
    }

    /// The slot's worker exited at `now`: how long it lived (0 if its start is not known).
    public mutating func workerExited(now: Int64) -> Int64 {
        let lived = now - (startedAt ?? now)
        startedAt = nil
        return lived
    }

    /// After an exit (`status`; nil: the worker could not be spawned) of a worker that lived
    /// `livedNs`: start again at once after a healthy run or after a signal killed a ready
    /// worker, else after the back-off (jittered with `random`).
    ///
    /// A service never has every slot in back-off while one could start: when a signal killed
    /// this worker and no other slot has a worker (`anotherSlotHasWorker`), it starts at once,
    /// provided a worker of the service became ready since the last such rescue (`rescue`).
    /// `onTrial`: the slot's generation is on trial (`Supervisor.isOnTrial`); its deaths by a
    /// signal count as crashes (a segfault right after READY=1 must count towards its rollback,
    /// not restart at once for ever).
    public mutating func afterExit(livedNs: Int64, status: WaitStatus?, now: Int64, policy: RestartPolicy,
                                   onTrial: Bool, stopping: Bool, anotherSlotHasWorker: Bool,
                                   rescue: inout RescueBudget,
                                   random: inout some RandomNumberGenerator) -> RestartDecision {
        if downSince == nil { downSince = now }
        var killed = false
        if case .killed = status, !onTrial { killed = true }
        let delay: Int
        (delay, quickExits) = policy.afterExit(livedMs: Int(livedNs / 1_000_000), quickExits: quickExits,
                                               killedBySignal: killed)
        if stopping { return .none }
        if delay > 0, killed, !anotherSlotHasWorker, rescue.allowsRescue {
            rescue.lastRescueAt = now
            rescue.starts += 1
            return .startNow(rescue: (rescue.starts, delay))
        }
        if delay == 0 { return .startNow(rescue: nil) }
        let jittered = RestartPolicy.jittered(delay, using: &random)
        nextStartAt = now + Int64(jittered) * 1_000_000
        return .startAt(nextStartAt!, delayMs: jittered)
    }

    /// The start timer: when the next worker starts, nil while the slot has one or the daemon stops.
    public func startDeadline(hasWorker: Bool, stopping: Bool) -> Int64? {
        hasWorker || stopping ? nil : nextStartAt
    }

    /// The ready timer of a worker that does not speak sd_notify (`waitsForReady`: it has a
    /// worker, starting or on a failed-over slot, and is not one that says READY=1 itself).
    public func readyDeadline(waitsForReady: Bool, policy: RestartPolicy) -> Int64? {
        guard waitsForReady, let startedAt else { return nil }
        return startedAt + Int64(policy.readyAfterMs) * 1_000_000
    }

    /// The failover timer: `failoverAfterMs` after the slot went down, unless its buckets are
    /// failed over already or the daemon stops.
    public func failoverDeadline(failoverAfterMs: Int, failedOver: Bool, stopping: Bool) -> Int64? {
        guard let downSince, !failedOver, !stopping else { return nil }
        return downSince + Int64(failoverAfterMs) * 1_000_000
    }

    /// The failover could not be written: try again after another failover delay, not in a busy loop.
    public mutating func failoverNotWritten(now: Int64) { downSince = now }
}

/// What the stall check makes of one slot's samples.
public enum StallVerdict: Equatable, Sendable {
    case unchanged
    /// A running worker's queue stayed full while its drops grew for `samplesToMark` samples in
    /// a row: the slot is stalled (counted, logged, its state `stalled`).
    case stalled
    /// A stalled slot's queues drained: running again.
    case runningAgain

    /// `fullWithGrowingDrops`: samples in a row with a full queue and more drops; `drained`: every
    /// queue holds less than half its buffer.
    public init(state: WorkerState, fullWithGrowingDrops: Int, drained: Bool, samplesToMark: Int) {
        if state == .running, fullWithGrowingDrops >= samplesToMark {
            self = .stalled
        } else if state == .stalled, drained {
            self = .runningAgain
        } else {
            self = .unchanged
        }
    }
}

/// What the last upgrade of a service makes of its slots' worker exits: which generation is on
/// trial, whether an exit abandons the upgrade, whether a crash loop rolls it back.
public struct GenerationTrial: Equatable, Sendable {
    public var phase: UpgradeStatus.Phase
    /// The upgrade is itself a rollback (`reuseportctl upgrade --rollback`, or an automatic one).
    public var isRollback: Bool
    public var generation: UInt32
    public var previous: UInt32
    /// A slot of the previous generation is still there (draining): it can be rolled back to.
    public var previousHasSlots: Bool

    public init(phase: UpgradeStatus.Phase, isRollback: Bool, generation: UInt32, previous: UInt32,
                previousHasSlots: Bool) {
        self.phase = phase
        self.isRollback = isRollback
        self.generation = generation
        self.previous = previous
        self.previousHasSlots = previousHasSlots
    }

    /// A slot of the new generation from the start of its learning until the generation before
    /// it has retired (while it can still be rolled back to that one): its workers' deaths by a
    /// signal all count as crashes (`SlotLifecycle.afterExit`'s `onTrial`).
    public func isOnTrial(slotGeneration: UInt32) -> Bool {
        guard !isRollback, phase == .learning || phase == .switched else { return false }
        return slotGeneration == generation && previousHasSlots
    }

    /// A worker of a generation still starting exited: the upgrade is abandoned (a program that
    /// cannot stay up must not take flows). `newSlot`: the slot is one of the upgrade's.
    public func abandons(newSlot: Bool) -> Bool { phase == .starting && newSlot }

    /// After an exit: a generation that switched and crash-loops on a slot is rolled back to the
    /// generation still draining, whose workers never stopped serving their flows.
    public func rollsBack(slotGeneration: UInt32, _ lifecycle: SlotLifecycle) -> Bool {
        lifecycle.crashLoops && phase == .switched && !isRollback && slotGeneration == generation
    }
}
