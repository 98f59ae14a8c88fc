import CReuseportABI
import Foundation
import PropertyBased
import ReuseportTestTraits
import Testing

@testable import ReuseportKit

/// The placement model under random sequences of the operations the daemon makes (scale, restore,
/// failover, upgrade start, switch, abandon and rollback, a canary's start, promotion and
/// rollback, the periodic check that switches,
/// sweeps and retires, a reload's rebuild, a daemon restart on the pins), in process and without
/// root. A simulated kernel carries the model's writes out one at a time and steers live flows
/// as rp_dispatch() does (bucket, flags, flow records, fallback table), so what is checked is what
/// the maps would do, between any two writes:
/// - after every write, every live flow lands on a slot that holds a socket, and on the slot it
///   landed on before (a flow of a slot failed over is the exception: its worker is gone);
/// - after every operation, the model's invariants hold (`PlacementModel.violations`), the
///   simulated maps say exactly what the model says, and the model read back from its own pins
///   is the same placement.
/// A failing sequence shrinks to the fewest, simplest operations; its seed replays it.
@Suite(.onTestThreads) struct PlacementModelTests {
    static let idleMs = 3_000
    static let stepNs: Int64 = 1_000_000_000

    /// The maps of one plane as rp_dispatch() sees them, changed only by `PlacementEffect`s.
    struct SimulatedMaps {
        var held: Set<UInt32> = []
        var buckets: [UInt32] = []
        var fallback: [UInt32] = []
        var next: [UInt32]?
        var slotCount = 0
        var liveCount = 0
        /// RP_CONFIG_CHANGING: without it the program reads no bucket's flags.
        var changing = false
        var transition = rp_transition()
        /// rp_flows: flow (its hash) → recorded slot, last seen.
        var records: [UInt32: (slot: UInt32, seen: Int64)] = [:]

        mutating func apply(_ effect: PlacementEffect) {
            switch effect {
            case .insertSockets(let slot): held.insert(slot)
            case .closeSockets(let slot), .takeSockets(let slot): held.remove(slot)
            case .writeFallback(let table, _): fallback = table
            case .writeConfig(let slots, let live, _, let flagged): (slotCount, liveCount, changing) = (slots, live, flagged)
            case .writeChanging(let flagged): changing = flagged
            case .writeBuckets(let values, _): buckets = values
            case .writeNextBuckets(let table): next = table
            case .writeTransition(let record): transition = record
            case .clearRecords: records.removeAll()
            case .clearUntrackedMarkers: break
            }
        }

        /// Where one datagram of the flow goes (rp_dispatch(), for a UDP flow), nil: dropped.
        mutating func deliver(_ flow: UInt32, now: Int64) -> UInt32? {
            guard !buckets.isEmpty else { return nil }
            let value = buckets[Int(FlowHash.bucket(hash: flow, count: UInt32(buckets.count)))]
            let flags = changing ? value & UInt32(RP_BUCKET_FLAGS) : 0
            if flags != 0, let record = records[flow] {
                records[flow]?.seen = now
                if held.contains(record.slot) { return record.slot }
            }
            let learn = flags & UInt32(RP_BUCKET_LEARN) != 0
            var candidates = [rp_bucket_slot(value)]
            if liveCount > 0, fallback.count == Int(RP_FALLBACK_BUCKETS) {
                let first = FlowHash.fallbackIndex(hash: flow)
                candidates += (0..<UInt32(RP_FALLBACK_TRIES)).map { fallback[Int((first + $0) & UInt32(RP_FALLBACK_BUCKETS - 1))] }
            }
            guard let slot = candidates.first(where: { held.contains($0) }) else { return nil }
            if learn, records[flow] == nil { records[flow] = (slot, now) }
            return slot
        }

        /// What the maps say, compared with what the model says; nil when they agree.
        func disagreement(with model: PlacementModel) -> String? {
            if held != Set(model.slotGenerations.keys) { return "sockets at \(held.sorted()), model \(model.liveSlots)" }
            if buckets != model.bucketValues { return "rp_buckets differs from the model's table" }
            if fallback != model.fallback { return "rp_fallback differs from the model's" }
            if slotCount != model.slots.count { return "slot_count \(slotCount), model \(model.slots.count)" }
            if changing != model.isChanging { return "RP_CONFIG_CHANGING is \(changing), the model's flags say \(model.isChanging)" }
            if let pending = model.pending, next != pending.effective { return "rp_next_buckets differs from the change's target" }
            if transition != model.transitionRecord { return "rp_transition differs from the model's" }
            return nil
        }
    }

    /// One random run: the model, its maps, the live flows and the slot each one is on.
    struct Run {
        var model: PlacementModel
        var maps = SimulatedMaps()
        var now: Int64 = 1_000_000_000
        /// Live flows: the step after which each stops sending.
        var flows: [UInt32: Int] = [:]
        /// The slot each live flow landed on; a flow missing here lands anywhere once.
        var on: [UInt32: UInt32] = [:]
        var random: UInt64
        var step = 0
        var log: [String] = []
        var problems: [String] = []

        init(seed: UInt64) throws {
            random = seed | 1
            model = try PlacementModel(bucketCount: 64, slotCount: 4,
                                       tracking: .init(idleTimeoutMs: PlacementModelTests.idleMs, drainTimeoutMs: 0),
                                       hasUDP: true)
            // Maps of 8 slots, fewer than the data plane gives 4 workers (16), so that the
            // sequences often need more: such upgrades and scales are refused and change nothing.
            model.slotCapacity = 8
            for effect in model.initialEffects() { maps.apply(effect) }
            for _ in 0..<24 { addFlow() }
        }

        mutating func next() -> UInt32 {
            random = random &* 6364136223846793005 &+ 1442695040888963407
            return UInt32(truncatingIfNeeded: random >> 33)
        }

        mutating func addFlow() { flows[next()] = step + 2 + Int(next() % 12) }

        /// Every live flow sends one datagram: it must land where it landed before.
        mutating func send(after what: String) {
            for flow in flows.keys.sorted() {
                guard let slot = maps.deliver(flow, now: now) else {
                    problems.append("\(what): flow \(flow) was dropped (no slot holds a socket for it)")
                    continue
                }
                // A failed-over slot has no worker: its flows may go anywhere.
                if let was = on[flow], was != slot, !model.failedOver.contains(was) {
                    problems.append("\(what): flow \(flow) moved from slot \(was) to \(slot)")
                }
                on[flow] = slot
            }
        }

        /// Carries one operation's writes out one by one, sending after each.
        mutating func apply(_ effects: [PlacementEffect], _ what: String) {
            for (index, effect) in effects.enumerated() {
                maps.apply(effect)
                send(after: "\(what), write \(index + 1) of \(effects.count) (\(effect.name))")
            }
        }

        /// Runs `operation` on a copy of the model: a refused one changes nothing.
        mutating func attempt(_ what: String, _ operation: (inout PlacementModel) throws -> [PlacementEffect]) {
            var copy = model
            guard let effects = try? operation(&copy) else {
                log.append("\(what) (refused)")
                return
            }
            log.append(what)
            model = copy
            apply(effects, what)
        }

        /// The daemon's periodic check of a change (Supervisor.checkTransition): switch when
        /// due, sweep the records, retire each leaving slot without live records.
        mutating func check() {
            attempt("switch") { [now] model in model.advance(now: now)?.effects ?? [] }
            var live: [UInt32: Int] = [:]
            for (flow, record) in maps.records {
                let idle = UInt64(max(0, now - record.seen))
                if model.recordIsStale(slot: record.slot, idleNs: idle, forget: model.failedOver) {
                    maps.records.removeValue(forKey: flow)
                } else {
                    live[record.slot, default: 0] += 1
                }
            }
            let total = live.values.reduce(0, +)
            attempt("sweep") { model in model.finishIfDone(live: total) ?? [] }
            for slot in model.slotsToRetire(liveBySlot: live, now: now) {
                attempt("retire \(slot)") { try $0.retire(slot) }
            }
        }

        mutating func perform(_ code: UInt16) throws {
            let argument = Int(code / 16)
            switch code % 19 {
            case 0, 1, 2, 3:
                check()
            case 4, 5:
                let count = 1 + argument % 7
                attempt("scale \(count)") { [now] in try $0.beginResize(to: count, now: now).effects }
            case 6:
                let count = 1 + argument % 4
                attempt("upgrade: start \(count)") { try $0.startGeneration(count: count).effects }
            case 7, 8:
                attempt("upgrade: switch") { [now] in try $0.switchGeneration(now: now).effects }
            case 9:
                attempt("upgrade: abandon") { $0.abandonGeneration() }
            case 10:
                let generations = Set(model.leaving.compactMap { model.slotGenerations[$0] }).sorted()
                guard !generations.isEmpty else { return check() }
                let generation = generations[argument % generations.count]
                attempt("roll back to \(generation)") { [now] in try $0.rollBack(to: generation, now: now).effects }
            case 11:
                guard !model.slots.isEmpty else { return }
                let slot = model.slots[argument % model.slots.count]
                // Its worker is gone: its flows go elsewhere, and once the table is written its
                // records are forgotten (ServiceRuntime.failOver).
                for (flow, was) in on where was == slot { on.removeValue(forKey: flow) }
                attempt("fail over \(slot)") { [now] in try $0.setFailedOver(slot, failing: true, now: now).effects }
                for (flow, record) in maps.records where record.slot == slot { maps.records.removeValue(forKey: flow) }
            case 12:
                guard let slot = model.failedOver.sorted().first else { return check() }
                attempt("restore \(slot)") { [now] in $0.beginRestore(slot, now: now).effects }
            case 13:
                try rebuild()
            case 14:
                try restart()
            case 15, 16:
                let percent = 1 + argument % 50
                attempt("canary \(percent)%") { [now] in try $0.startCanary(percent: percent, now: now).effects }
            case 17:
                attempt("canary: promote") { [now] in try $0.switchGeneration(now: now).effects }
            default:
                attempt("canary: roll back") { [now] in try $0.rollBackCanary(now: now).effects }
            }
        }

        /// A reload that rebuilds the plane: new maps, the placement carried, the records copied;
        /// then the new program takes over the group.
        mutating func rebuild() throws {
            // A canary is not carried (its slots close): its flows go back to the working generation.
            for (flow, was) in on where model.canary?.slots.contains(was) == true { on.removeValue(forKey: flow) }
            var rebuilt = try PlacementModel(bucketCount: model.bucketCount, slotCount: model.slots.count,
                                             tracking: model.deferredTracking ?? model.tracking, hasUDP: true)
            // New maps, at least as large as the running ones (ServiceRuntime passes their capacity).
            rebuilt.slotCapacity = max(SlotCapacity.sized(workers: model.slots.count).value, model.slotCapacity)
            var fresh = SimulatedMaps()
            for effect in rebuilt.initialEffects() { fresh.apply(effect) }
            for effect in try rebuilt.continueGenerations(working: model.workingGeneration, last: model.lastGeneration) {
                fresh.apply(effect)
            }
            for effect in rebuilt.carry(from: model, now: now) { fresh.apply(effect) }
            fresh.records = maps.records
            fresh.apply(.writeTransition(rebuilt.transitionRecord))
            log.append("rebuild")
            model = rebuilt
            maps = fresh
            send(after: "rebuild")
        }

        /// A daemon started again on the pins: the model is read back from what they say.
        mutating func restart() throws {
            let resumed = try PlacementModel(resuming: model.pinnedImage(), tracking: model.deferredTracking ?? model.tracking,
                                             hasUDP: true, now: now)
            var shell = resumed
            shell.slotCapacity = model.slotCapacity  // the pinned maps keep their size
            var effects = resumed.liveSlots.map { PlacementEffect.insertSockets(slot: $0) }
            effects += shell.spreadFallback(over: shell.fallbackSlots)
            effects.append(.writeTransition(shell.transitionRecord))
            if let (_, rebalancing) = shell.rebalanceIfStarved(now: now) { effects += rebalancing }
            log.append("daemon restart")
            model = shell
            apply(effects, "daemon restart")
        }

        /// After each operation: the invariants, the maps against the model, the pins read back.
        mutating func verify() {
            for broken in model.violations() { problems.append("after \(log.last ?? "start"): \(broken)") }
            if model.isStarved, model.pendingGeneration == nil {
                problems.append("after \(log.last ?? "start"): a slot that takes flows holds less than its share of buckets")
            }
            if let disagreement = maps.disagreement(with: model) {
                problems.append("after \(log.last ?? "start"): the maps disagree with the model: \(disagreement)")
            }
            if var resumed = try? PlacementModel(resuming: model.pinnedImage(), tracking: model.tracking, hasUDP: true,
                                                 now: now) {
                // The capacity is the maps' size, not something the pins say.
                resumed.slotCapacity = model.slotCapacity
                let expected = PlacementModelTests.resumable(model, now: now)
                if resumed != expected {
                    problems.append("after \(log.last ?? "start"): the model read back from its pins differs: "
                        + PlacementModelTests.difference(resumed, expected))
                }
            } else {
                problems.append("after \(log.last ?? "start"): the model's own pins cannot be read back")
            }
        }

        /// Time passes; flows end and begin.
        mutating func tick() {
            step += 1
            now += PlacementModelTests.stepNs
            for (flow, end) in flows where end < step {
                flows.removeValue(forKey: flow)
                on.removeValue(forKey: flow)
            }
            addFlow()
            addFlow()
            send(after: "step \(step)")
        }
    }

    /// What a daemon started on a placement's pins resumes: not the failover (the table keeps
    /// the lent buckets where they are), not a starting generation (its slots leave), and no
    /// drain deadline while a new change learns (the switch sets it). Slots that leave with no
    /// change running leave as a change started `now`.
    static func resumable(_ model: PlacementModel, now: Int64) -> PlacementModel {
        var expected = model
        expected.buckets = model.effectiveBuckets
        expected.failedOver = []
        expected.pending = model.pending.map {
            PendingPlacement(buckets: $0.effective, slots: $0.slots, failed: [], switchNs: $0.switchNs)
        }
        if let starting = model.startingGeneration {
            expected.startingGeneration = nil
            expected.leaving.formUnion(starting.slots)
        }
        if model.pending != nil { expected.drainDeadlineNs = nil }
        if expected.transitionStartedNs == nil, !expected.leaving.isEmpty { expected.transitionStartedNs = now }
        expected.deferredTracking = nil
        expected.closed = []
        // A canary is not in the pins: its slots leave as a starting generation's, and its buckets
        // (in the table, or in the learning change's) go back at the daemon's first check
        // (`rebalanceIfStarved`).
        expected.canary = nil
        return expected
    }

    static func difference(_ a: PlacementModel, _ b: PlacementModel) -> String {
        var parts: [String] = []
        for (name, x, y) in [("slots", "\(a.slots)", "\(b.slots)"), ("leaving", "\(a.leaving.sorted())", "\(b.leaving.sorted())"),
                             ("generations", "\(a.slotGenerations.sorted { $0.key < $1.key })", "\(b.slotGenerations.sorted { $0.key < $1.key })"),
                             ("working", "\(a.workingGeneration)/\(a.lastGeneration)", "\(b.workingGeneration)/\(b.lastGeneration)"),
                             ("pending", "\(a.pending.map { "\($0.slots) at \($0.switchNs)" } ?? "none")", "\(b.pending.map { "\($0.slots) at \($0.switchNs)" } ?? "none")"),
                             ("pending generation", "\(a.pendingGeneration.map(String.init) ?? "none")", "\(b.pendingGeneration.map(String.init) ?? "none")"),
                             ("buckets", "\(a.buckets == b.buckets)", "true"), ("flags", "\(a.bucketFlags == b.bucketFlags)", "true"),
                             ("started", "\(a.transitionStartedNs ?? -1)", "\(b.transitionStartedNs ?? -1)"),
                             ("deadline", "\(a.drainDeadlineNs ?? -1)", "\(b.drainDeadlineNs ?? -1)")] where x != y {
            parts.append("\(name): read back \(x), expected \(y)")
        }
        return parts.isEmpty ? "(fields not named here)" : parts.joined(separator: "; ")
    }

    /// How many sequences: 300 in `make test`, `PLACEMENT_SEQUENCES` for a longer run (`make chaos`).
    static let sequences = ProcessInfo.processInfo.environment["PLACEMENT_SEQUENCES"].flatMap(Int.init) ?? 300

    /// `sequences` sequences of up to 40 operations, each followed by a step of time in which every
    /// live flow sends: no flow moves and none is dropped between any two writes, and after
    /// every operation the invariants hold, the maps say what the model says, and the pins
    /// read back to the same placement.
    @Test func everySequenceOfOperationsKeepsEveryLiveFlowAndTheInvariants() async {
        await propertyCheck(count: Self.sequences, input: Gen.uint64(in: 1...UInt64.max),
                            Gen.uint16(in: 0...UInt16.max).array(of: 1...40)) { seed, codes in
            guard var run = try? Run(seed: seed) else {
                Issue.record("a 4-slot placement could not be made")
                return
            }
            run.send(after: "start")
            for code in codes {
                do {
                    try run.perform(code)
                } catch {
                    run.problems.append("\(run.log.last ?? "start"): \(error)")
                }
                run.verify()
                run.tick()
                if !run.problems.isEmpty { break }
            }
            #expect(run.problems.isEmpty,
                    "seed \(seed), operations: \(run.log.joined(separator: " → "))\n\(run.problems.prefix(5).joined(separator: "\n"))")
        }
    }
}

extension PlacementEffect {
    /// The case's name, for the failure messages.
    var name: String {
        switch self {
        case .insertSockets(let slot): return "insert slot \(slot)"
        case .closeSockets(let slot): return "close slot \(slot)"
        case .takeSockets(let slot): return "take slot \(slot)"
        case .writeFallback: return "rp_fallback"
        case .writeConfig: return "rp_config"
        case .writeChanging(let changing): return "RP_CONFIG_CHANGING \(changing ? "up" : "down")"
        case .writeBuckets: return "rp_buckets"
        case .writeNextBuckets: return "rp_next_buckets"
        case .writeTransition: return "rp_transition"
        case .clearRecords: return "clear records"
        case .clearUntrackedMarkers: return "clear untracked markers"
        }
    }
}
