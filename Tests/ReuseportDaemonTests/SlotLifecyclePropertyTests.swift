import Foundation
import PropertyBased
import ReuseportDaemon
import ReuseportKit
import ReuseportTestTraits
import Synchronization
import Testing

/// `SlotLifecycle` under random sequences of events on a service of 1 to 4 slots, in process,
/// with an injected clock and a seeded random source. `Shell` plays the supervisor's part as
/// `Supervisor` does (it starts a worker where a decision says so, fires the timers at their
/// deadlines, fails a slot over and restores it), so the decisions checked are the daemon's own;
/// after every event the invariants hold. A failing sequence shrinks to the shortest list of the
/// smallest event codes.
@Suite(.onTestThreads) struct SlotLifecyclePropertyTests {
    static let ms: Int64 = 1_000_000

    /// How many sequences: 2,000 by default, `LIFECYCLE_SEQUENCES` for a longer run.
    static let sequences = ProcessInfo.processInfo.environment["LIFECYCLE_SEQUENCES"].flatMap(Int.init) ?? 2_000

    struct Shell {
        let policy: RestartPolicy
        let failoverAfterMs: Int
        let watchdogMs: Int
        /// Workers sent SIGABRT by their watchdog, which die of it at the next `+ ms`.
        var aborted: Set<Int32> = []
        var watchdogMisses = 0
        var failovers = 0
        var backOffs = 0
        var slots: [SlotLifecycle]
        var pid: [Int32?]
        var ready: [Bool]
        var failedOver: [Bool]
        var rescue = RescueBudget()
        var live: Set<Int32> = []
        var nextPid: Int32 = 100
        var now: Int64 = 0
        var stopping = false
        /// The program cannot be spawned (every start fails as the daemon's does: no status, lived 0).
        var spawnFails = false
        /// The slots' generation is on trial (a new generation baking or learning).
        var onTrial = false
        var random: SeededRandom
        /// Workers that sent WATCHDOG=trigger.
        var triggered: Set<Int32> = []
        var log: [String] = []
        var problems: [String] = []

        init(seed: UInt64) {
            random = SeededRandom(seed: seed)
            let count = Int(seed % 4) + 1
            let minimum = [50, 100, 250][Int(seed / 4 % 3)]
            policy = RestartPolicy(backoffMinimumMs: minimum,
                                   backoffMaximumMs: minimum * [4, 20, 100][Int(seed / 12 % 3)],
                                   healthyAfterMs: [1_000, 10_000][Int(seed / 36 % 2)], readyAfterMs: 500)
            failoverAfterMs = [300, 2_000][Int(seed / 72 % 2)]
            watchdogMs = [0, 400, 3_000][Int(seed / 144 % 3)]
            slots = Array(repeating: SlotLifecycle(), count: count)
            pid = Array(repeating: nil, count: count)
            ready = Array(repeating: false, count: count)
            failedOver = Array(repeating: false, count: count)
            for slot in 0..<count { start(slot) }
        }

        /// Carries out a start, as `Supervisor.startWorker` does (a spawn that fails backs off).
        mutating func start(_ slot: Int) {
            if stopping { problems.append("slot \(slot) started while stopping") }
            if let running = pid[slot] { problems.append("slot \(slot) started a second worker beside pid \(running)") }
            slots[slot].nextStartAt = nil
            guard !spawnFails else { return exited(slot, lived: 0, status: nil) }
            nextPid += 1
            pid[slot] = nextPid
            live.insert(nextPid)
            ready[slot] = false
            slots[slot].started(now: now, watchdogMs: watchdogMs)
        }

        /// The worker of `slot` exited with `status` (nil: could not be spawned).
        mutating func exit(_ slot: Int, _ status: WaitStatus) {
            guard let running = pid[slot] else { return }
            if !live.contains(running) { problems.append("pid \(running) exited but was not tracked") }
            live.remove(running)
            aborted.remove(running)
            pid[slot] = nil
            ready[slot] = false
            let lived = slots[slot].workerExited(now: now)
            exited(slot, lived: lived, status: status)
        }

        mutating func exited(_ slot: Int, lived: Int64, status: WaitStatus?) {
            let another = pid.indices.contains { $0 != slot && pid[$0] != nil }
            let couldRescue = rescue.allowsRescue && !another && !onTrial && !stopping
            let killed = { if case .killed = status { return true } else { return false } }()
            let before = slots[slot].quickExits
            let decision = slots[slot].afterExit(livedNs: lived, status: status, now: now, policy: policy,
                                                 onTrial: onTrial, stopping: stopping, anotherSlotHasWorker: another,
                                                 rescue: &rescue, random: &random)
            let healthy = lived >= Int64(policy.healthyAfterMs) * ms
            let readyKill = killed && !onTrial && lived >= Int64(policy.readyAfterMs) * ms
            let expected = readyKill ? 0 : (healthy ? 0 : before) + 1
            if slots[slot].quickExits != expected {
                problems.append("slot \(slot): \(slots[slot].quickExits) quick exits, expected \(expected)")
            }
            switch decision {
            case .none:
                if !stopping { problems.append("slot \(slot): no restart although not stopping") }
            case .startNow(let rescued):
                if rescued != nil, !(couldRescue && killed) { problems.append("slot \(slot): a rescue not allowed") }
                start(slot)
            case .startAt(let at, let delay):
                backOffs += 1
                if couldRescue && killed {
                    problems.append("slot \(slot): every slot dark and a rescue allowed, backs off \(delay) ms")
                }
                if at < now { problems.append("slot \(slot) scheduled in the past: \(at) < \(now)") }
                let maximum = policy.backoffMaximumMs + policy.backoffMaximumMs / 4
                if delay < policy.backoffMinimumMs || delay > maximum {
                    problems.append("slot \(slot): back-off \(delay) ms outside \(policy.backoffMinimumMs)...\(maximum)")
                }
            }
        }

        /// The earliest timer of any slot, as `SupervisorTimers` lists them.
        func nextDeadline() -> (at: Int64, slot: Int, kind: String)? {
            var due: [(at: Int64, slot: Int, kind: String)] = []
            for slot in slots.indices {
                if let at = slots[slot].startDeadline(hasWorker: pid[slot] != nil, stopping: stopping) {
                    due.append((at, slot, "start"))
                }
                if let at = slots[slot].readyDeadline(waitsForReady: pid[slot] != nil && !ready[slot], policy: policy) {
                    due.append((at, slot, "ready"))
                }
                if let at = slots[slot].watchdogTimer(hasWorker: pid[slot] != nil, stopping: stopping,
                                                      watchdogMs: watchdogMs) { due.append((at, slot, "watchdog")) }
                if let at = slots[slot].failoverDeadline(failoverAfterMs: failoverAfterMs, failedOver: failedOver[slot],
                                                         stopping: stopping) { due.append((at, slot, "failover")) }
            }
            return due.min { $0.at < $1.at }
        }

        mutating func becameReady(_ slot: Int) {
            ready[slot] = true
            failedOver[slot] = false
            slots[slot].ready(now: now, rescue: &rescue)
        }

        /// Lets `ms` milliseconds pass, firing each timer at its deadline.
        mutating func advance(by duration: Int64) {
            let end = now + duration
            while let next = nextDeadline(), next.at <= end {
                if next.at < now {
                    problems.append("slot \(next.slot)'s \(next.kind) timer at \(next.at), in the past of \(now)")
                }
                now = max(now, next.at)
                switch next.kind {
                case "start": start(next.slot)
                case "ready": becameReady(next.slot)
                case "watchdog":
                    if let deadline = slots[next.slot].watchdogDeadline, let started = slots[next.slot].startedAt,
                       deadline - started < Int64(watchdogMs) * ms, !triggered.contains(pid[next.slot] ?? 0) {
                        problems.append("slot \(next.slot)'s watchdog fired \((deadline - started) / ms) ms after its start")
                    }
                    if slots[next.slot].watchdogExpired(hasWorker: pid[next.slot] != nil), let running = pid[next.slot] {
                        watchdogMisses += 1
                        aborted.insert(running)
                    }
                default:
                    if let down = slots[next.slot].downSince, now - down < Int64(failoverAfterMs) * ms {
                        problems.append("slot \(next.slot) failed over after \((now - down) / ms) ms down")
                    }
                    failedOver[next.slot] = true
                    failovers += 1
                }
                if problems.count > 0 { return }
            }
            now = end
            // SIGABRT kills what the watchdog stopped.
            for slot in pid.indices where pid[slot].map(aborted.contains) == true { exit(slot, .killed(signal: SIGABRT)) }
        }

        mutating func perform(_ code: UInt16) {
            let slot = Int(code / 8) % slots.count
            let argument = Int(code / 64)
            switch code % 8 {
            case 0, 1:
                log.append("+\(argument % 3_000) ms")
                advance(by: Int64(argument % 3_000) * ms)
            case 2:
                log.append("slot \(slot) exits \(argument % 3)")
                exit(slot, .exited(Int32(argument % 3)))
            case 3:
                let signal = [SIGKILL, SIGSEGV, SIGABRT][argument % 3]
                log.append("slot \(slot) killed by \(signal)")
                exit(slot, .killed(signal: signal))
            case 4:
                spawnFails.toggle()
                log.append(spawnFails ? "spawns fail" : "spawns work")
            case 5:
                onTrial.toggle()
                log.append(onTrial ? "on trial" : "not on trial")
            case 6 where argument % 4 == 0:
                log.append("slot \(slot) WATCHDOG=trigger")
                if let running = pid[slot] { triggered.insert(running) }
                slots[slot].watchdogNotified(now: now, watchdogMs: 0, trigger: true)
            case 6 where argument % 4 == 1:
                log.append("slot \(slot) WATCHDOG=1")
                if pid[slot] != nil { slots[slot].watchdogNotified(now: now, watchdogMs: watchdogMs) }
            case 6:
                log.append("slot \(slot) READY=1")
                if pid[slot] != nil, !ready[slot] { becameReady(slot) }
            default:
                if argument % 32 == 0 {
                    log.append("stop")
                    stopping = true
                } else {
                    log.append("slot \(slot) exits at once")
                    exit(slot, .exited(1))
                }
            }
        }

        /// What holds after every event.
        mutating func verify() {
            let tracked = Set(pid.compactMap { $0 })
            if tracked != live { problems.append("started and not exited \(live.sorted()), on slots \(tracked.sorted())") }
            for slot in slots.indices {
                let lifecycle = slots[slot]
                if pid[slot] == nil, !stopping, lifecycle.startDeadline(hasWorker: false, stopping: false) == nil {
                    problems.append("slot \(slot) is dark and has no start due")
                }
                if let at = lifecycle.startDeadline(hasWorker: pid[slot] != nil, stopping: stopping), at < now {
                    problems.append("slot \(slot)'s start at \(at) was missed (now \(now))")
                }
                if (pid[slot] == nil) != (lifecycle.startedAt == nil) {
                    let started = lifecycle.startedAt.map(String.init) ?? "none"
                    problems.append("slot \(slot): worker \(pid[slot].map(String.init) ?? "none"), started at \(started)")
                }
                if ready[slot], let down = lifecycle.downSince {
                    problems.append("slot \(slot) ready and down since \(down)")
                }
                if failedOver[slot], ready[slot] { problems.append("slot \(slot) ready and failed over") }
                if pid[slot] == nil,
                   lifecycle.watchdogTimer(hasWorker: false, stopping: stopping, watchdogMs: watchdogMs) != nil {
                    problems.append("slot \(slot) has no worker and a watchdog due")
                }
                if let running = pid[slot], !stopping, watchdogMs > 0, !aborted.contains(running),
                   lifecycle.watchdogDeadline == nil {
                    problems.append("slot \(slot)'s worker pid \(running) runs without its watchdog")
                }
                if lifecycle.quickExits < 0 { problems.append("slot \(slot): \(lifecycle.quickExits) quick exits") }
                if let at = lifecycle.nextStartAt, pid[slot] == nil, !stopping {
                    let maximum = Int64(policy.backoffMaximumMs + policy.backoffMaximumMs / 4) * ms
                    if at - now > maximum {
                        problems.append("slot \(slot) starts in \((at - now) / ms) ms, beyond the maximum")
                    }
                }
            }
            if !stopping, pid.allSatisfy({ $0 == nil }), slots.allSatisfy({ $0.nextStartAt == nil }) {
                problems.append("every slot dark and none may start")
            }
            if rescue.starts < 0 || (rescue.lastRescueAt != nil && rescue.lastRescueAt! > now) {
                problems.append("rescue budget \(rescue)")
            }
        }
    }

    @Test func everySequenceOfEventsKeepsTheInvariants() async {
        // What the sequences did, summed: proof that the rules were exercised, not only held.
        let seen = Mutex([0, 0, 0, 0, 0])
        let clock = ContinuousClock()
        let started = clock.now
        await propertyCheck(count: Self.sequences, input: Gen.uint64(in: 1...UInt64.max),
                            Gen.uint16(in: 0...UInt16.max).array(of: 1...60)) { seed, codes in
            var shell = Shell(seed: seed)
            shell.verify()
            for code in codes {
                shell.perform(code)
                shell.verify()
                if !shell.problems.isEmpty { break }
            }
            let counts = [codes.count, shell.backOffs, shell.rescue.starts, shell.failovers, shell.watchdogMisses]
            seen.withLock { $0 = zip($0, counts).map(+) }
            let problems = shell.problems.prefix(5).joined(separator: "\n")
            #expect(shell.problems.isEmpty, "seed \(seed), events: \(shell.log.joined(separator: " → "))\n\(problems)")
        }
        let totals = seen.withLock { $0 }
        print("SlotLifecycle: \(Self.sequences) sequences, \(totals[0]) events, in \(clock.now - started): "
            + "\(totals[1]) back-offs, \(totals[2]) rescue starts, \(totals[3]) failovers, \(totals[4]) watchdog misses")
        #expect(totals[1...].allSatisfy { $0 > 0 }, "every rule exercised: \(totals)")
    }
}
