#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Synchronization
import SystemPackage
import Testing

/// The upgrades' exec worker (Tests/upgrade/worker.py): answers as whoami does, plus its version.
enum UpgradeWorker {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("upgrade/worker.py").path
    static let python = "/usr/bin/python3"

    static func program(_ version: String, _ options: [String] = []) -> String {
        let argv = [python, script, version] + options
        return "exec = [" + argv.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
    }
}

/// Generations: a new worker definition starts on new slots and takes flows only once every new
/// worker said READY=1; live flows keep their old worker until idle, and a bad deploy never
/// takes a flow. The real daemon, python workers, real datagrams; the tables read back from the
/// pinned maps.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"),
       .enabled(if: access(UpgradeWorker.python, X_OK) == 0, "the upgrade tests' worker is a python3 script"))
struct UpgradeTests {
    static let idleMs = 1000

    static func config(_ version: String, _ options: [String] = [], workers: Int = 4, extra: String = "") -> String {
        serviceTable("gen", workers: workers, program: UpgradeWorker.program(version, options), extra: """
            rcvbuf = 8388608
            notify = true
            flow_idle_timeout_ms = \(idleMs)
            drain_signal = "SIGUSR2"
            \(extra)
            """)
    }

    /// Flows labelled by who answered: "pid/version".
    static func sessions(_ count: Int) throws -> Sessions {
        try Sessions(count) { "\($0.pid)/\($0.extra["version"] ?? "?")" }
    }

    static func maps(_ daemon: TestDaemon) throws -> DispatchMaps {
        try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "gen"))
    }

    /// The slots the program may steer a new flow to: every slot the bucket table and the
    /// fallback table name.
    static func steeredSlots(_ maps: DispatchMaps) throws -> Set<UInt32> {
        let config = try maps.readConfig()
        return Set(try maps.readBuckets(count: Int(config.bucket_count))).union(try maps.readFallback())
    }

    /// v1 → v2 under 256 flows sending every 200 ms: none loses a datagram or changes worker;
    /// the switch begins only once all four v2 workers sent READY=1 (they wait 1 s to); new flows
    /// get v2; the v1 workers get the drain signal and are stopped once their flows are idle.
    @Test func upgradeKeepsLiveFlowsAndWaitsForReady() throws {
        let daemon = try TestDaemon(config: Self.config("v1"))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "gen")
        let v1 = Set(before[0].slots.compactMap(\.pid))
        #expect(before[0].slots.allSatisfy { $0.generation == 1 && $0.notifiedReady == true })
        let maps = try Self.maps(daemon)
        let sessions = try Self.sessions(256)
        try sessions.run(5, to: destination)
        let readyDelayMs = 1000
        var steeredWhileStarting: Set<UInt32> = []
        var sawStarting = false
        try sessions.run(30, to: destination) { round in
            if round == 5 {
                try daemon.rewriteConfig(Self.config("v2", ["--ready-after-ms", "\(readyDelayMs)"]))
                let response = try daemon.request(ControlRequest(command: .reload))
                #expect(response.ok, "\(response)")
                print("reload v1 → v2: \(response.message ?? "")")
            }
            // The tables first: if the upgrade is still starting after, it was while they were read.
            let steered = try Self.steeredSlots(maps)
            if round > 5, let upgrade = try daemon.status()[0].upgrade, upgrade.phase == .starting {
                sawStarting = true
                steeredWhileStarting.formUnion(steered)
            }
        }
        let status = try daemon.waitFor("generation 2 switched", timeoutMs: 10_000) {
            $0[0].upgrade?.phase == .switched
        }[0]
        let upgrade = try #require(status.upgrade)
        let v2Slots = status.slots.filter { $0.generation == 2 }
        print("256 flows × \(sessions.rounds) rounds through v1 → v2: \(sessions.moved.count) changed worker, "
            + "\(sessions.lost) lost, versions \(versions(sessions).sorted()); upgrade \(upgrade)")
        #expect(sessions.lost == 0, "no datagram lost: \(sessions.report)")
        #expect(sessions.moved.isEmpty, "every live flow kept its worker: \(sessions.moved.prefix(5))")
        #expect(versions(sessions) == ["v1"] && pids(sessions).isSubset(of: v1), "live flows stayed with v1")
        #expect(sawStarting, "the upgrade was seen starting")
        #expect(steeredWhileStarting.isSubset(of: Set(before[0].slots.map(\.slot))),
                "no table named a v2 slot before the switch: \(steeredWhileStarting.sorted())")
        #expect(upgrade.generation == 2 && upgrade.previous == 1)
        #expect(v2Slots.map(\.slot) == upgrade.slots && v2Slots.count == 4)
        #expect(v2Slots.allSatisfy { $0.notifiedReady == true })
        // The gate, in the daemon's own times: every v2 worker was ready (READY=1, sent 1 s after
        // its start) before learning began, and learning began before the buckets switched.
        let readyTimes = v2Slots.compactMap(\.readySinceNs)
        let learning = try #require(upgrade.learningNs)
        let switched = try #require(upgrade.switchedNs)
        print("started \(upgrade.startedNs), ready \(readyTimes.sorted()), learning \(learning), switched \(switched)")
        #expect(readyTimes.count == 4)
        #expect(readyTimes.allSatisfy { $0 >= upgrade.startedNs + UInt64(readyDelayMs) * 1_000_000 - 50_000_000 })
        #expect(readyTimes.allSatisfy { $0 <= learning } && learning < switched)
        #expect(upgrade.readyNs == readyTimes.max())

        // New flows go to v2 only.
        let fresh = try Whoami.ask(try Traffic.clients(256, on: .loopbackV4), to: destination).compactMap { $0 }
        let freshVersions = Set(fresh.map { $0.extra["version"] ?? "?" })
        let freshSlots = Set(fresh.map(\.slot))
        print("256 new flows after the switch: versions \(freshVersions.sorted()), slots \(freshSlots.sorted())")
        #expect(fresh.count == 256 && freshVersions == ["v2"])
        #expect(freshSlots == Set(upgrade.slots))

        // The old flows stopped: the v1 slots retire once idle, and their workers exit.
        let after = try daemon.waitFor("the v1 slots retired", timeoutMs: 15_000) { services in
            services[0].slots.allSatisfy { $0.generation == 2 }
        }
        let gone = nowMs() + 5000
        while v1.contains(where: processExists), nowMs() < gone { sleepMs(20) }
        #expect(!v1.contains(where: processExists), "the v1 workers were stopped")
        #expect(after[0].removedSlotDrops == 0)
        #expect(after[0].generation == 2)
        #expect(daemon.log.contains("version v1 slot 0: draining"), "the v1 workers got the drain signal")
        let change = try maps.readTransition()
        #expect(change.working_generation == 2 && change.last_generation == 2, "the generations are pinned")
    }

    /// A v2 that never says READY=1, and one that exits at once: no flow ever reaches it, v1
    /// serves throughout (same pids), and the upgrade is reported abandoned with the reason.
    @Test(arguments: [
        (["--never-ready"], "not every new worker was ready within ready_timeout_ms (1500 ms)"),
        (["--exit-at-once"], "exited with status 3"),
    ])
    func badGenerationNeverTakesAFlow(options: [String], reason: String) throws {
        let daemon = try TestDaemon(config: Self.config("v1", extra: "ready_timeout_ms = 1500"))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "gen")
        let v1Slots = Set(before[0].slots.map(\.slot))
        let v1 = Set(before[0].slots.compactMap(\.pid))
        let maps = try Self.maps(daemon)
        let sessions = try Self.sessions(128)
        var steered: Set<UInt32> = []
        try sessions.run(15, to: destination) { round in
            if round == 2 {
                try daemon.rewriteConfig(Self.config("v2", options, extra: "ready_timeout_ms = 1500"))
                let response = try daemon.request(ControlRequest(command: .reload))
                #expect(response.ok, "\(response)")
            }
            steered.formUnion(try Self.steeredSlots(maps))
        }
        let status = try daemon.waitFor("the upgrade abandoned", timeoutMs: 10_000) {
            $0[0].upgrade?.phase == .abandoned
        }[0]
        let upgrade = try #require(status.upgrade)
        // Flows that start after the abandon get v1 too.
        let fresh = try Whoami.ask(try Traffic.clients(64, on: .loopbackV4), to: destination).compactMap { $0 }
        print("bad v2 \(options): \(upgrade.reason ?? "?"); \(sessions.lost) lost, versions \(versions(sessions).sorted())")
        #expect(upgrade.generation == 2 && upgrade.reason?.contains(reason) == true, "\(upgrade)")
        #expect(sessions.lost == 0 && versions(sessions) == ["v1"] && pids(sessions).isSubset(of: v1), "\(sessions.report)")
        #expect(steered.isSubset(of: v1Slots), "no table ever named a v2 slot: \(steered.sorted())")
        #expect(Set(status.slots.map(\.slot)) == v1Slots && status.slots.allSatisfy { $0.generation == 1 })
        #expect(Set(status.slots.compactMap(\.pid)) == v1, "v1's workers served throughout")
        #expect(status.generation == 1)
        #expect(fresh.count == 64 && fresh.allSatisfy { $0.extra["version"] == "v1" })
        let sockets = try SocketArray(pinned: PinLayout(root: daemon.pinRoot, service: "gen"), listener: 0)
        #expect(try sockets.liveSlots(below: 16) == v1Slots, "the v2 slots' sockets left the array")
        #expect(daemon.log.contains("generation 2 abandoned"))
        // The number is spent: the next upgrade is generation 3.
        let next = try daemon.request(ControlRequest(command: .upgrade, service: "gen"))
        #expect(next.ok && next.services?[0].upgrade?.generation == 3, "\(next)")
    }
}

private func versions(_ sessions: Sessions) -> Set<String> {
    Set(sessions.answers.flatMap { $0.map { String($0.split(separator: "/")[1]) } })
}

private func pids(_ sessions: Sessions) -> Set<Int32> {
    Set(sessions.answers.flatMap { $0.compactMap { Int32($0.split(separator: "/")[0]) } })
}

extension UpgradeTests {
    /// v1 → v2, then a roll back while v1 still drains: v1's flows stay with v1 throughout, the
    /// flows that started on v2 stay with v2 until idle, new flows go back to v1, and v2's
    /// workers are stopped once their flows are idle.
    @Test func rollbackWhileTheOldGenerationDrains() throws {
        let daemon = try TestDaemon(config: Self.config("v1"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "gen")
        let old = try Self.sessions(128)
        let onV2 = try Self.sessions(128)
        var phase = "v1"
        var v2Pids: Set<Int32> = []
        var round = 0
        while phase != "done" {
            guard round < 100 else { throw HarnessError("no roll back after 100 rounds; log:\n\(daemon.logTail(20))") }
            try old.run(1, to: destination)
            if phase != "v1" { try onV2.run(1, to: destination) }
            let upgrade = try daemon.status()[0].upgrade
            switch phase {
            case "v1" where round == 3:
                try daemon.rewriteConfig(Self.config("v2"))
                #expect(try daemon.request(ControlRequest(command: .reload)).ok)
            case "v1" where upgrade?.phase == .switched:
                phase = "v2"
                v2Pids = Set(try daemon.status()[0].slots.filter { $0.generation == 2 }.compactMap(\.pid))
            case "v2" where onV2.rounds == 3:
                let response = try daemon.request(ControlRequest(command: .upgrade, service: "gen", rollback: true))
                #expect(response.ok, "\(response)")
                print("roll back: \(response.message ?? response.error ?? "")")
                phase = "rolling back"
            case "rolling back" where upgrade?.rollback == true && upgrade?.phase == .switched:
                phase = "rolled back"
            case "rolled back" where onV2.rounds >= 3 + 10:
                phase = "done"
            default:
                break
            }
            round += 1
        }
        let status = try daemon.status()[0]
        let fresh = try Whoami.ask(try Traffic.clients(128, on: .loopbackV4), to: destination).compactMap { $0 }
        print("roll back: v1 flows \(versions(old).sorted()), \(old.moved.count) moved, \(old.lost) lost; "
            + "v2 flows \(versions(onV2).sorted()), \(onV2.moved.count) moved, \(onV2.lost) lost; new flows "
            + "\(Set(fresh.map { $0.extra["version"] ?? "?" }).sorted()); upgrade \(String(describing: status.upgrade))")
        #expect(status.generation == 1 && status.upgrade?.generation == 1 && status.upgrade?.previous == 2)
        #expect(old.lost == 0 && old.moved.isEmpty && versions(old) == ["v1"], "v1's flows stayed with v1: \(old.report)")
        #expect(onV2.lost == 0 && onV2.moved.isEmpty && versions(onV2) == ["v2"], "v2's flows stayed with v2: \(onV2.report)")
        #expect(pids(onV2).isSubset(of: v2Pids))
        #expect(fresh.count == 128 && fresh.allSatisfy { $0.extra["version"] == "v1" }, "new flows go back to v1")

        try daemon.waitFor("the v2 slots retired", timeoutMs: 15_000) { services in
            services[0].slots.allSatisfy { $0.generation == 1 }
        }
        let gone = nowMs() + 5000
        while v2Pids.contains(where: processExists), nowMs() < gone { sleepMs(20) }
        #expect(!v2Pids.contains(where: processExists), "v2's workers were stopped once their flows were idle")
        let again = try daemon.request(ControlRequest(command: .upgrade, service: "gen", rollback: true))
        #expect(!again.ok && again.error?.contains("generation 2 has no slot left") == true, "\(again)")
    }
}

extension UpgradeTests {
    /// `reuseportctl upgrade` against the real daemon: it waits for the switch and says so; the
    /// generations show in `map dump`, `which` and `stats --prometheus`, all read from the pins.
    @Test func theCommandLineShowsGenerations() throws {
        let daemon = try TestDaemon(config: Self.config("v1"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "gen")
        let locations = ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory]
        func ctl(_ arguments: [String]) throws -> (status: Int32, stdout: String) {
            let result = try Subprocess.run(BuiltProducts.path("reuseportctl"), arguments + locations,
                                            captureStandardError: true)
            return (result.status.shellStatus, result.output + result.errors)
        }
        let upgrade = try ctl(["upgrade"])
        print(upgrade.stdout)
        #expect(upgrade.status == 0, "\(upgrade)")
        #expect(upgrade.stdout.contains("upgrading gen to generation 2 on slots 4, 5, 6, 7"))
        #expect(upgrade.stdout.contains("gen: generation 2 works; generation 1 drains"))

        let dump = try ctl(["map", "dump"])
        print(dump.stdout)
        #expect(dump.stdout.contains("generation 2 working (slots 4,5,6,7)"), "\(dump.stdout)")
        #expect(dump.stdout.contains("upgrade    generation 2 switched (from 1, slots 4,5,6,7)"))
        #expect(dump.stdout.contains("STATUS=    slot 4: version v1, generation 2"), "the workers' STATUS= lines")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let which = try ctl(["which", "\(client.local)", "--to", "\(destination)"])
        #expect(which.stdout.contains("generation 2 (working)"), "\(which)")
        let metrics = try ctl(["stats", "--prometheus"])
        #expect(metrics.stdout.contains("reuseport_working_generation{service=\"gen\"} 2"), "\(metrics.stdout)")
        #expect(metrics.stdout.contains("reuseport_upgrades_switched_total{service=\"gen\"} 1"))
        #expect(metrics.stdout.contains("reuseport_slot_generation{service=\"gen\",slot=\"4\"} 2"))

        // A scale after the upgrade grows the working generation (on the lowest slots no other
        // generation holds), and reuseportctl waits for it.
        let scale = try ctl(["scale", "6"])
        #expect(scale.status == 0, "\(scale)")
        let grown = try daemon.status()[0].slots.filter { $0.generation == 2 }.map(\.slot)
        #expect(grown.count == 6 && Set(grown).isSuperset(of: [4, 5, 6, 7]), "\(grown)")
    }
}

extension UpgradeTests {
    /// A TCP service upgraded (its environment changed) while 8 clients keep opening connections:
    /// none is refused or reset; new connections go to the new generation from the switch on
    /// (TCP needs no learning: an accepted connection never moves), and the old listeners close
    /// once their accept queues are empty. A connection opened before the upgrade stays with its
    /// old worker, which is stopped only at drain_timeout_ms after the switch.
    @Test func tcpUpgradeRefusesNoConnection() throws {
        func config(_ release: Int) -> String {
            serviceTable("stream", listen: ["tcp://127.0.0.1:0"], workers: 4,
                         extra: "environment = [\"RELEASE=\(release)\"]\ndrain_timeout_ms = 3000")
        }
        let daemon = try TestDaemon(config: config(1))
        let services = try daemon.waitForWorkers()
        let destination = try Endpoint(parsing: try #require(services[0].listeners.first)).address
        let held = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
        try held.connect(to: destination)
        func ask(_ client: FlowClient) throws -> WhoamiReply? {
            try client.send(Array("still there?\n".utf8), to: destination)
            return try client.receive(timeoutMs: 3000).flatMap { WhoamiReply($0) }
        }
        let first = try #require(try ask(held))
        let stop = Atomic<Bool>(false)
        let switched = Atomic<Bool>(false)
        let done = Atomic<Int>(0)
        let doneAfterSwitch = Atomic<Int>(0)
        let failures = Mutex<[String]>([])
        let slotsAfterSwitch = Mutex<Set<UInt32>>([])
        let group = DispatchGroup()
        for _ in 0..<8 {
            DispatchQueue.global().async(group: group) {
                while !stop.load(ordering: .relaxed) {
                    let after = switched.load(ordering: .relaxed)
                    do {
                        let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
                        try client.connect(to: destination)
                        try client.send(Array("hello\n".utf8), to: destination)
                        guard let bytes = try client.receive(timeoutMs: 3000), let reply = WhoamiReply(bytes) else {
                            throw HarnessError("no answer on an accepted connection")
                        }
                        if after {
                            slotsAfterSwitch.withLock { _ = $0.insert(reply.slot) }
                            doneAfterSwitch.add(1, ordering: .relaxed)
                        }
                        done.add(1, ordering: .relaxed)
                        // Paced: each closed connection holds its port in TIME_WAIT for 60 s.
                        usleep(4000)
                    } catch {
                        failures.withLock { $0.append("\(error)") }
                    }
                }
            }
        }
        sleepMs(500)
        try daemon.rewriteConfig(config(2))
        let reload = try daemon.request(ControlRequest(command: .reload))
        #expect(reload.ok, "\(reload)")
        let status = try daemon.waitFor("generation 2 switched", timeoutMs: 10_000) { $0[0].upgrade?.phase == .switched }
        switched.store(true, ordering: .relaxed)
        _ = try daemon.waitFor("the old listeners retired", timeoutMs: 10_000) { services in
            services[0].slots.allSatisfy { $0.generation == 2 }
        }
        sleepMs(500)
        stop.store(true, ordering: .relaxed)
        group.wait()
        let again = try ask(held)
        let heldWorkerServes = processExists(first.pid)
        let leaving = try daemon.status()[0].leaving ?? []
        #expect(leaving.contains { $0.pid == first.pid && $0.state == .holding },
                "the status names the old worker that holds its connections: \(leaving)")
        let stoppedBy = nowMs() + 8000
        while processExists(first.pid), nowMs() < stoppedBy { sleepMs(50) }
        #expect(again?.pid == first.pid, "the connection opened before the upgrade stays with its old worker")
        #expect(heldWorkerServes && !processExists(first.pid), "its worker is stopped at drain_timeout_ms")
        let newSlots = Set(try #require(status[0].upgrade).slots)
        let failed = failures.withLock { $0 }
        print("TCP upgrade under 8 connecting clients: \(done.load(ordering: .relaxed)) connections served, "
            + "\(failed.count) failed (\(failed.prefix(2))); after the switch on slots "
            + "\(slotsAfterSwitch.withLock { $0.sorted() })")
        // How many a shared machine serves varies (180 to 700 seen); what matters is that they came
        // on through the upgrade and after its switch.
        #expect(doneAfterSwitch.load(ordering: .relaxed) >= 20,
                "connections kept coming after the switch: \(doneAfterSwitch.load(ordering: .relaxed))")
        #expect(failed.isEmpty, "none refused or reset: \(failed.prefix(3))")
        #expect(slotsAfterSwitch.withLock { $0 } == newSlots, "new connections go to the new generation")
    }
}

extension UpgradeTests {
    /// The daemon is killed (SIGKILL) while an upgrade's switch learns, or while the old
    /// generation drains after it, and started again on the same pins: it resumes the change with
    /// each slot in its generation, every live flow still reaches its slot through the switch, new
    /// flows go to generation 2 once it works, and the next upgrade is generation 3: a number is
    /// never given twice.
    @Test(arguments: [UpgradeStatus.Phase.learning, .switched])
    func aDaemonKilledMidUpgradeResumes(_ phase: UpgradeStatus.Phase) throws {
        let port = try freePort()
        func config(_ version: String) -> String {
            serviceTable("gen", listen: ["udp://127.0.0.1:\(port)"], workers: 4,
                         program: UpgradeWorker.program(version), extra: """
                rcvbuf = 8388608
                notify = true
                flow_idle_timeout_ms = 2000
                """)
        }
        let first = try TestDaemon(config: config("v1"))
        let destination = try udpEndpoint(try first.waitForWorkers(), "gen")
        let sessions = try Sessions(128)
        try sessions.run(3, to: destination)
        let before = sessions.slots
        try first.rewriteConfig(config("v2"))
        #expect(try first.request(ControlRequest(command: .reload)).ok)
        var reached = false
        while !reached {
            try sessions.run(1, to: destination)
            reached = try first.status()[0].upgrade?.phase == phase
            guard sessions.rounds < 60 else { throw HarnessError("no \(phase); log:\n\(first.logTail(20))") }
        }
        try sessions.run(2, to: destination)
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)

        let second = try TestDaemon(config: config("v2"), pinRoot: first.pinRoot)
        let resumed = try second.waitFor("8 slots with a running worker") { services in
            services[0].slots.filter { $0.state == "running" }.count == 8
        }[0]
        let generations = Dictionary(grouping: resumed.slots, by: { $0.generation ?? 0 }).mapValues { $0.map(\.slot) }
        #expect(generations[2] == [4, 5, 6, 7] && generations[1] == [0, 1, 2, 3], "\(generations)")
        // The flows send on through the rest of the change: each keeps its slot.
        try sessions.run(15, to: destination)
        let working = try second.waitFor("generation 2 working", timeoutMs: 10_000) { $0[0].generation == 2 }[0]
        let fresh = try Whoami.ask(try Traffic.clients(128, on: .loopbackV4), to: destination).compactMap { $0 }
        print("resumed (killed while \(phase)): generations \(generations.sorted { $0.key < $1.key }), working "
            + "\(working.generation ?? 0); \(zip(sessions.slots, before).filter { $0 != $1 }.count) of 128 live flows "
            + "on another slot, \(sessions.moved.count) changed worker; new flows on \(Set(fresh.map(\.slot)).sorted())")
        #expect(sessions.slots == before, "every live flow still reaches its slot")
        #expect(Set(fresh.map(\.slot)) == [4, 5, 6, 7], "new flows go to generation 2")
        _ = try second.waitFor("generation 1's slots retired", timeoutMs: 15_000) { services in
            services[0].slots.allSatisfy { $0.generation == 2 }
        }
        let next = try second.request(ControlRequest(command: .upgrade, service: "gen"))
        #expect(next.ok && next.services?[0].upgrade?.generation == 3, "\(next)")
    }
}

extension UpgradeTests {
    /// A v2 that says READY=1 and then dies: the upgrade switches (every worker was ready), v2
    /// crash-loops, and it is rolled back to v1 by itself. v1's live flows never left v1 and lose
    /// nothing; new flows go to v1 again. However v2 dies counts: an exit 300 ms after its start,
    /// or SIGSEGV 1 s after it, past `ready_after_ms` (a signal death outside a bake time counts
    /// as a kill from outside, which restarts at once and does not count as a quick exit).
    @Test(arguments: [["--exit-after-ms", "300"], ["--crash-after-ms", "1000"]])
    func aCrashLoopAfterTheSwitchRollsBack(_ crash: [String]) throws {
        let daemon = try TestDaemon(config: Self.config("v1"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "gen")
        let sessions = try Self.sessions(128)
        try sessions.run(3, to: destination)
        try daemon.rewriteConfig(Self.config("v2", crash))
        #expect(try daemon.request(ControlRequest(command: .reload)).ok)
        var rolledBack: UpgradeStatus?
        while rolledBack == nil {
            try sessions.run(1, to: destination)
            if let upgrade = try daemon.status()[0].upgrade, upgrade.rollback == true, upgrade.phase == .switched {
                rolledBack = upgrade
            }
            guard sessions.rounds < 100 else { throw HarnessError("no roll back; log:\n\(daemon.logTail(30))") }
        }
        try sessions.run(3, to: destination)
        let fresh = try Whoami.ask(try Traffic.clients(64, on: .loopbackV4), to: destination).compactMap { $0 }
        print("crash loop (\(crash.joined(separator: " "))): \(rolledBack?.reason ?? "?"); v1 flows \(versions(sessions).sorted()), "
            + "\(sessions.lost) lost; new flows \(Set(fresh.map { $0.extra["version"] ?? "?" }).sorted())")
        #expect(rolledBack?.generation == 1 && rolledBack?.previous == 2)
        #expect(rolledBack?.reason?.contains("generation 2 crash-looped after its switch") == true)
        #expect(sessions.lost == 0 && sessions.moved.isEmpty && versions(sessions) == ["v1"], "\(sessions.report)")
        #expect(fresh.count == 64 && fresh.allSatisfy { $0.extra["version"] == "v1" }, "new flows go to v1 again")
        #expect(try daemon.status()[0].generation == 1)
    }
}

extension UpgradeTests {
    /// v1 → v2 → v3 while v1's flows still send: two generations drain at once. v1's flows stay
    /// with v1 and v2's with v2 until idle, new flows go to v3, and each old generation's workers
    /// stop once its own flows are idle.
    @Test func twoGenerationsDrainAtOnce() throws {
        let daemon = try TestDaemon(config: Self.config("v1"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "gen")
        let onV1 = try Self.sessions(64)
        let onV2 = try Self.sessions(64)
        var v2Started = false
        var round = 0
        func upgrade(to version: String) throws {
            try daemon.rewriteConfig(Self.config(version))
            #expect(try daemon.request(ControlRequest(command: .reload)).ok)
        }
        func working(_ generation: Int) throws -> Bool {
            let status = try daemon.status()[0]
            return status.generation == generation && status.upgrade?.phase == .switched
        }
        try upgrade(to: "v2")
        while try !working(2) {
            try onV1.run(1, to: destination)
            round += 1
            guard round < 60 else { throw HarnessError("v2 did not switch; log:\n\(daemon.logTail(20))") }
        }
        try upgrade(to: "v3")
        while try !working(3) {
            try onV1.run(1, to: destination)
            if v2Started || round % 2 == 0 {
                try onV2.run(1, to: destination)
                v2Started = true
            }
            round += 1
            guard round < 120 else { throw HarnessError("v3 did not switch; log:\n\(daemon.logTail(20))") }
        }
        let during = try daemon.status()[0]
        let draining = Dictionary(grouping: during.slots, by: { $0.generation ?? 0 }).mapValues(\.count)
        for _ in 0..<3 {
            try onV1.run(1, to: destination)
            try onV2.run(1, to: destination)
        }
        let fresh = try Whoami.ask(try Traffic.clients(64, on: .loopbackV4), to: destination).compactMap { $0 }
        print("three generations: slots per generation \(draining.sorted { $0.key < $1.key }); v1 flows "
            + "\(versions(onV1).sorted()) (\(onV1.lost) lost, \(onV1.moved.count) moved), v2 flows "
            + "\(versions(onV2).sorted()) (\(onV2.lost) lost, \(onV2.moved.count) moved), new flows "
            + "\(Set(fresh.map { $0.extra["version"] ?? "?" }).sorted())")
        #expect(draining == [1: 4, 2: 4, 3: 4], "generations 1 and 2 drain beside 3")
        #expect(onV1.lost == 0 && onV1.moved.isEmpty && versions(onV1) == ["v1"], "\(onV1.report)")
        #expect(onV2.lost == 0 && onV2.moved.isEmpty && versions(onV2) == ["v2"], "\(onV2.report)")
        #expect(fresh.count == 64 && fresh.allSatisfy { $0.extra["version"] == "v3" })
        try daemon.waitFor("generations 1 and 2 retired", timeoutMs: 15_000) { services in
            services[0].slots.allSatisfy { $0.generation == 3 }
        }
    }
}

extension UpgradeTests {
    /// A TCP service on two listeners (v4 and v6) whose workers stop accepting at
    /// `drain_signal = "SIGQUIT"` (they close their listeners, as nginx does), upgraded right
    /// after a burst of 600 connects that generation 1 has not accepted yet (its workers are
    /// paused, SIGSTOP, as workers busy with a burst are slow): the old listeners retire with
    /// connections in their accept queues that nobody will accept. The 16 connections held open
    /// since before stay with their generation 1 worker until drain_timeout_ms after the switch
    /// (docs/configuration.md, "Generations"), and only then is it stopped; the burst's
    /// connections are all answered (the kernel moves what waited at a closed listener to a live
    /// one: ReuseportMigration).
    @Test func tcpUpgradeDuringABurstKeepsAcceptedConnections() throws {
        let drainTimeoutMs = 10_000
        func config(_ version: String) -> String {
            serviceTable("stream", listen: ["tcp://127.0.0.1:0", "tcp://[::1]:0"], workers: 4,
                         program: UpgradeWorker.program(version, ["--close-listeners-on-drain"]), extra: """
                notify = true
                drain_signal = "SIGQUIT"
                drain_timeout_ms = \(drainTimeoutMs)
                """)
        }
        let daemon = try TestDaemon(config: config("v1"))
        let services = try daemon.waitForWorkers()
        let destinations = try services[0].listeners.map { try Endpoint(parsing: $0).address }
        #expect(destinations.count == 2 && destinations[0].address.isV4 && !destinations[1].address.isV4)
        let oldWorkers = services[0].slots.compactMap(\.pid)

        var held: [(client: FlowClient, pid: Int32)] = []
        for index in 0..<16 {
            let client = try FlowClient(.tcp, local: SocketAddress(destinations[index % 2].address, 0))
            try client.connect(to: destinations[index % 2])
            guard case .reply(let reply) = StreamAnswer.ask(client, "held \(index)"), reply.extra["generation"] == "1" else {
                throw HarnessError("held connection \(index) got no answer from generation 1; log:\n\(daemon.logTail(20))")
            }
            held.append((client, reply.pid))
        }

        // The burst: completed handshakes wait in generation 1's accept queues.
        for pid in oldWorkers { try Syscall.kill(pid, SIGSTOP) }
        defer { for pid in oldWorkers { try? Syscall.kill(pid, SIGCONT) } }
        var burst: [FlowClient] = []
        for index in 0..<600 {
            let client = try FlowClient(.tcp, local: SocketAddress(destinations[index % 2].address, 0))
            try client.connect(to: destinations[index % 2])
            try client.send(Array("burst \(index)\n".utf8), to: destinations[index % 2])
            burst.append(client)
        }
        let response = try daemon.request(ControlRequest(command: .upgrade, service: "stream"))
        #expect(response.ok, "\(response)")
        let status = try daemon.waitFor("generation 2 switched", timeoutMs: 30_000) {
            $0[0].upgrade?.phase == .switched
        }[0]
        // Resumed, each generation 1 worker takes its SIGQUIT (sent at the switch) first: it
        // closes its listeners with the burst still queued there.
        for pid in oldWorkers { try Syscall.kill(pid, SIGCONT) }
        let switchedNs = try #require(status.upgrade?.switchedNs)
        let holdEndsNs = switchedNs + UInt64(drainTimeoutMs) * 1_000_000

        // Until drain_timeout_ms after the switch (the daemon's clock is the wall clock), each held
        // connection answers from the worker that accepted it. Asked every 250 ms: a late answer
        // only makes the window longer, never a loss.
        var lost: [String] = []
        var round = 0
        while lost.isEmpty, WallClock.nanoseconds() < holdEndsNs {
            for (index, connection) in held.enumerated() {
                let answer = StreamAnswer.ask(connection.client, "still there \(round)")
                let afterMs = (Int64(WallClock.nanoseconds()) - Int64(switchedNs)) / 1_000_000
                switch answer {
                case .reply(let reply) where reply.pid == connection.pid:
                    break
                case .reply(let reply):
                    lost.append("held connection \(index) answered by pid \(reply.pid), not \(connection.pid), \(afterMs) ms after the switch")
                case .closed(let why) where WallClock.nanoseconds() < holdEndsNs:
                    lost.append("held connection \(index) of pid \(connection.pid): \(why) \(afterMs) ms after the switch")
                case .closed:
                    break  // the hold ended meanwhile
                }
            }
            round += 1
            sleepMs(250)
        }
        var burstGenerations: [String: Int] = [:]
        var burstLost: [String] = []
        for (index, client) in burst.enumerated() {
            switch StreamAnswer.read(client) {
            case .reply(let reply): burstGenerations["generation \(reply.extra["generation"] ?? "?")", default: 0] += 1
            case .closed(let why): burstLost.append("burst connection \(index): \(why)")
            }
        }
        print("TCP upgrade with 600 connects queued at generation 1: \(16 - lost.count) of 16 held connections "
            + "kept their worker until drain_timeout_ms; burst answered by \(burstGenerations.sorted { $0.key < $1.key }), "
            + "\(burstLost.count) lost")
        if !lost.isEmpty || !burstLost.isEmpty { print("daemon log kept at \(daemon.keepLog())") }
        #expect(lost.isEmpty, "held connections lost before drain_timeout_ms after the switch: \(lost)")
        if ReuseportMigration.isSupported {
            #expect(burstLost.isEmpty, "every connection of the burst is answered: \(burstLost.prefix(5))")
        }

        // Then generation 1's workers are stopped.
        let gone = nowMs() + 20_000
        while oldWorkers.contains(where: processExists), nowMs() < gone { sleepMs(50) }
        #expect(!oldWorkers.contains(where: processExists), "generation 1's workers are stopped once drain_timeout_ms passed")
    }
}

/// What a TCP client got for a line it sent: the whoami answer, or why there was none.
private enum StreamAnswer {
    case reply(WhoamiReply)
    case closed(String)

    /// Sends `line` on `client` and reads the answer.
    static func ask(_ client: FlowClient, _ line: String) -> StreamAnswer {
        do {
            // MSG_NOSIGNAL: a connection its worker closed is an error here, not a SIGPIPE.
            _ = try Array("\(line)\n".utf8).withUnsafeBytes { bytes in
                try Syscall.send(FileDescriptor(rawValue: client.fd), bytes, flags: Int32(MSG_NOSIGNAL))
            }
        } catch {
            return .closed("\(error)")
        }
        return read(client)
    }

    /// Reads the answer to a line sent already.
    static func read(_ client: FlowClient) -> StreamAnswer {
        do {
            guard let bytes = try client.receive(timeoutMs: 10_000) else { return .closed("no answer in 10 s") }
            guard !bytes.isEmpty else { return .closed("end of file") }
            guard let reply = WhoamiReply(bytes) else { return .closed("not a whoami answer") }
            return .reply(reply)
        } catch {
            return .closed("\(error)")
        }
    }
}
