#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import SystemPackage
import Testing

/// The bake's decision, in process.
struct CanaryDecisionTests {
    @Test func aCanaryIsWorseWhenItHasMoreOfAnyKindPerWorker() {
        let none = GenerationEvents()
        #expect(none.worse(than: none, workers: 4, workingWorkers: 4, canary: 2, previous: 1) == nil)
        let healthy = GenerationEvents(healthFailures: 3)
        #expect(healthy.worse(than: none, workers: 4, workingWorkers: 4, canary: 2, previous: 1)
            == "generation 2 had 3 health-check failures on 4 workers, generation 1 0 on 4")
        // Per worker: 1 stall on 1 canary worker is worse than 3 on 8; 1 on 4 is not worse than 2 on 8.
        #expect(GenerationEvents(stalls: 1).worse(than: GenerationEvents(stalls: 3), workers: 1, workingWorkers: 8,
                                                  canary: 2, previous: 1) != nil)
        #expect(GenerationEvents(stalls: 1).worse(than: GenerationEvents(stalls: 2), workers: 4, workingWorkers: 8,
                                                  canary: 2, previous: 1) == nil)
        let crash = GenerationEvents(quickExits: 1, crashes: 1)
        #expect(crash.worse(than: none, workers: 4, workingWorkers: 4, canary: 3, previous: 2)?
            .hasPrefix("generation 3 had 1 quick exits") == true)
    }

    /// Kernel drops per packet: more than the margin (1 percentage point) above the working
    /// generation's is worse, once the canary was sent enough packets to tell; checked first.
    @Test func aCanaryThatDropsMoreOfItsPacketsIsWorse() {
        let working = GenerationEvents(packets: 10_000, drops: 100)
        #expect(GenerationEvents(packets: 1000, drops: 19).worse(than: working, workers: 2, workingWorkers: 2,
                                                                 canary: 2, previous: 1) == nil)
        #expect(GenerationEvents(packets: 1000, drops: 25).worse(than: working, workers: 2, workingWorkers: 2,
                                                                 canary: 2, previous: 1)
            == "generation 2's sockets dropped 25 of 1000 packets (2.50%), generation 1's 100 of 10000 (1.00%): "
            + "more than 1.00 percentage points above")
        // Too few packets to tell: 199 of 199 dropped is not yet worse.
        #expect(GenerationEvents(packets: 199, drops: 199).worse(than: GenerationEvents(), workers: 2,
                                                                 workingWorkers: 2, canary: 2, previous: 1) == nil)
        let both = GenerationEvents(healthFailures: 5, packets: 400, drops: 300)
        #expect(both.worse(than: GenerationEvents(packets: 400), workers: 2, workingWorkers: 2, canary: 2, previous: 1)?
            .hasPrefix("generation 2's sockets dropped 300 of 400 packets (75.00%)") == true)
    }

    @Test(arguments: [
        ("canary_percent = 0", "service[0].canary_percent: must be between 1 and 99 (percent of the buckets), got 0"),
        ("canary_bake_ms = 5", "service[0].canary_bake_ms: needs canary_percent"),
        ("canary_percent = 5\ncanary_gate = []", "service[0].canary_gate: must name a program"),
        ("canary_percent = 5\ncanary_bake_ms = -1", "service[0].canary_bake_ms: must be between 0 and 604800000"),
    ])
    func badCanarySettingsAreNamed(keys: String, expected: String) {
        let error = #expect(throws: ConfigurationError.self) {
            try ConfigurationParser.parse(serviceTable("c", workers: 2, extra: keys), file: "c.toml")
        }
        #expect(error?.description.hasPrefix("c.toml: " + expected) == true, "\(error.map { "\($0)" } ?? "no error")")
    }
}

/// Canary generations on a real daemon, with real workers and packets.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct CanaryTests {
    /// Flows that keep sending: each must be answered by the worker it had, every round.
    final class LiveFlows {
        let clients: [FlowClient]
        var workers: [Int32?]
        private(set) var lost = 0
        private(set) var moved = 0
        private(set) var rounds = 0

        init(_ clients: [FlowClient], first: [WhoamiReply?]) {
            self.clients = clients
            workers = first.map { $0?.pid }
        }

        func round(to destination: SocketAddress) {
            rounds += 1
            let answers = (try? Whoami.ask(clients, to: destination, attempts: 1)) ?? []
            for index in clients.indices {
                guard index < answers.count, let answer = answers[index] else { lost += 1; continue }
                if workers[index] == nil { workers[index] = answer.pid }
                if answer.pid != workers[index] { moved += 1 }
            }
        }
    }

    /// New flows, `count` of them in batches: how many each worker answered.
    static func fresh(_ count: Int, to destination: SocketAddress, while live: LiveFlows) throws -> [Int32: Int] {
        var answered: [Int32: Int] = [:]
        for _ in 0..<(count / 400) {
            let clients = try Traffic.clients(400, on: .loopbackV4)
            for answer in try Whoami.ask(clients, to: destination) { if let answer { answered[answer.pid, default: 0] += 1 } }
            live.round(to: destination)
        }
        return answered
    }

    static let settings = """
        flow_idle_timeout_ms = 1000

        [service.health_check]
        send = "ping"
        expect = "slot="
        interval_ms = 200
        timeout_ms = 150
        failures = 3
        """

    /// A daemon of 2 workers whose upgrades are canaries of 50% for `bakeMs`, then judged by a
    /// gate that exits `status`; with 32 live flows.
    static func gatedCanary(exiting status: Int, bakeMs: Int) throws -> (TestDaemon, SocketAddress, LiveFlows) {
        let daemon = try TestDaemon(config: serviceTable("c", workers: 2, extra: """
            flow_idle_timeout_ms = 500
            canary_percent = 50
            canary_bake_ms = \(bakeMs)
            canary_gate = ["/bin/sh", "-c", "exit \(status)"]
            """))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "c")
        let clients = try Traffic.clients(32, on: .loopbackV4)
        return (daemon, destination, LiveFlows(clients, first: try Whoami.ask(clients, to: destination)))
    }

    /// A canary of 10%: exactly 410 of 4096 buckets, 10% (±1%) of 10,000 new flows (σ 0.3%), none of the
    /// live flows; promoted, it takes every new flow, and no live flow moved or was lost.
    @Test func aTenPercentCanaryTakesTenPercentOfNewFlowsAndIsPromotedMovingNone() throws {
        let daemon = try TestDaemon(config: serviceTable("c", workers: 4, extra: Self.settings))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "c")
        let oldPids = Set(before[0].slots.compactMap(\.pid))
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let live = LiveFlows(clients, first: try Whoami.ask(clients, to: destination))
        #expect(live.workers.allSatisfy { $0.map(oldPids.contains) == true })
        let started = try daemon.request(.canary(service: "c", percent: 10, bakeMs: 600_000))
        #expect(started.ok, "\(started)")
        let baking = try daemon.waitFor("the canary takes flows") { services in
            live.round(to: destination)
            return services[0].upgrade?.bakeEndsNs != nil
        }
        let upgrade = try #require(baking[0].upgrade)
        #expect(upgrade.phase == .canary && upgrade.canaryBuckets == 410, "\(upgrade)")
        let canaryPids = Set(baking[0].slots.filter { $0.generation == upgrade.generation }.compactMap(\.pid))
        #expect(canaryPids.count == 4 && canaryPids.isDisjoint(with: oldPids))
        let answered = try Self.fresh(10_000, to: destination, while: live)
        let total = answered.values.reduce(0, +)
        let onCanary = answered.filter { canaryPids.contains($0.key) }.values.reduce(0, +)
        let share = Double(onCanary) / Double(max(total, 1))
        print("canary 10%: \(onCanary) of \(total) new flows (\(String(format: "%.2f", share * 100)) %)")
        #expect(total == 10_000)
        #expect(abs(share - 0.10) <= 0.01, "\(onCanary) of \(total) new flows went to the canary")
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost")
        // reuseportctl shows the canary: map dump's upgrade line and the metrics.
        let locations = ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory]
        let ctl = BuiltProducts.path("reuseportctl")
        let dump = try Subprocess.run(ctl, ["map", "dump"] + locations).output
        #expect(dump.contains("generation 2 canary (from 1, slots 4,5,6,7); canary 10% = 410 buckets, bake ends in"),
                "\(dump)")
        let metrics = try Subprocess.run(ctl, ["stats", "--prometheus"] + locations).output
        let gauge = metrics.split(separator: "\n").first { $0.hasPrefix("reuseport_canary_buckets{") }
        #expect(gauge.map { $0.hasSuffix(" 410") || $0.hasSuffix(" 410.0") } == true, "\(metrics)")
        // Flows per generation: map dump's shares line and its JSON, and the gauge, one per generation.
        #expect(dump.contains("  shares     generation 1 3686 buckets (90.0%), "), "\(dump)")
        #expect(dump.contains("; generation 2 410 buckets (10.0%), "), "\(dump)")
        let flowGauges = metrics.split(separator: "\n").filter { $0.hasPrefix("reuseport_generation_flows{") }
        #expect(flowGauges.count == 2 && flowGauges.contains { $0.contains("generation=\"2\"") }, "\(metrics)")
        let json = try Subprocess.run(ctl, ["map", "dump", "--json"] + locations).output
        let document = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let generations = try #require(((document["services"] as? [[String: Any]])?.first)?["generations"] as? [[String: Any]])
        #expect(generations.map { $0["generation"] as? Int } == [1, 2], "\(json)")
        #expect(generations.map { $0["buckets"] as? Int } == [3686, 410], "\(json)")
        #expect(generations.allSatisfy { $0["flows"] is Int }, "\(json)")
        // Some flows of the canary stay live through the promotion.
        let canaryClients = try Traffic.clients(200, on: .loopbackV4)
        let onIt = LiveFlows(canaryClients, first: try Whoami.ask(canaryClients, to: destination))
        #expect(onIt.workers.contains { $0.map(canaryPids.contains) == true })
        let promoted = try daemon.request(.canary(service: "c", promote: true))
        #expect(promoted.ok, "\(promoted)")
        let after = try daemon.waitFor("the canary promoted and switched") { services in
            live.round(to: destination)
            onIt.round(to: destination)
            return services[0].upgrade?.phase == .switched
        }
        #expect(after[0].upgrade?.reason?.hasPrefix("promoted: asked") == true, "\(String(describing: after[0].upgrade))")
        live.round(to: destination)
        onIt.round(to: destination)
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost in \(live.rounds) rounds")
        #expect(onIt.moved == 0 && onIt.lost == 0, "canary flows: \(onIt.moved) moved, \(onIt.lost) lost")
        let newFlows = try Traffic.clients(100, on: .loopbackV4)
        let now = try Whoami.ask(newFlows, to: destination)
        #expect(now.allSatisfy { $0.map { canaryPids.contains($0.pid) } == true }, "every new flow on generation 2")
        #expect(daemon.stop() == 0)
    }

    /// A version that answers wrongly (echo where the health check wants whoami's answer) is
    /// rolled back during the bake, and says why; its slots retire and every new flow is the old
    /// generation's again.
    @Test func aBadVersionIsRolledBackDuringTheBakeWithTheReason() throws {
        func config(_ builtin: String) -> String {
            serviceTable("c", workers: 4, program: "builtin = \"\(builtin)\"", extra: """
                canary_percent = 20
                canary_bake_ms = 600000
                """ + "\n" + Self.settings)
        }
        let daemon = try TestDaemon(config: config("whoami"))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "c")
        let oldPids = Set(before[0].slots.compactMap(\.pid))
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let live = LiveFlows(clients, first: try Whoami.ask(clients, to: destination))
        try daemon.rewriteConfig(config("echo"))
        let reload = try daemon.request(ControlRequest(command: .reload))
        #expect(reload.ok, "\(reload)")
        let rolled = try daemon.waitFor("the canary rolled back", timeoutMs: 60_000) { services in
            live.round(to: destination)
            return services[0].upgrade?.phase == .rolledBack
        }
        let reason = rolled[0].upgrade?.reason ?? ""
        #expect(reason.hasPrefix("automatic, during the bake: generation 2 had "), "\(reason)")
        #expect(reason.contains("health-check failures on 4 workers, generation 1 0 on 4"), "\(reason)")
        #expect(reason.contains("its live flows stay on it until idle"), "\(reason)")
        #expect(daemon.log.contains("canary rolled back: automatic, during the bake"))
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost")
        // Its slots retire once their flows are idle; then only generation 1 is left.
        _ = try daemon.waitFor("the canary's slots retired") { services in
            live.round(to: destination)
            return services[0].slots.allSatisfy { $0.generation == 1 }
        }
        let fresh = try Traffic.clients(200, on: .loopbackV4)
        let answers = try Whoami.ask(fresh, to: destination)
        #expect(answers.allSatisfy { $0.map { oldPids.contains($0.pid) } == true }, "every new flow on generation 1")
        #expect(daemon.stop() == 0)
    }

    /// The gate decides at the end of the bake, by its exit status: 0 promotes the canary by
    /// itself (every bucket switches; the live flows keep their workers throughout), 3 rolls it
    /// back, naming the gate and its status.
    @Test(arguments: [
        (0, UpgradeStatus.Phase.switched, "promoted: the bake passed and the gate (/bin/sh -c exit 0) exited with status 0"),
        (3, .rolledBack, "the gate (/bin/sh -c exit 3) exited with status 3 after the bake; its live flows stay on it"),
    ])
    func theGateDecidesByItsExitStatus(status: Int, phase: UpgradeStatus.Phase, reason expected: String) throws {
        let (daemon, destination, live) = try Self.gatedCanary(exiting: status, bakeMs: 1000)
        let started = try daemon.request(ControlRequest(command: .upgrade, service: "c"))
        #expect(started.ok, "\(started)")
        let after = try daemon.waitFor("the gate's decision carried out") { services in
            live.round(to: destination)
            return services[0].upgrade?.phase == phase
        }
        let reason = after[0].upgrade?.reason ?? ""
        #expect(reason.hasPrefix(expected), "\(reason)")
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost")
        #expect(daemon.stop() == 0)
    }

    /// A canary whose workers never read their sockets (a program that only sleeps) drops
    /// what it is sent: its kernel drops per packet, against the working generation's, roll it
    /// back during the bake, named; the live flows (all on generation 1) do not move.
    @Test func aCanaryThatDoesNotReadIsRolledBackForItsDrops() throws {
        func config(_ program: String) -> String {
            serviceTable("c", workers: 2, program: program, extra: """
                flow_idle_timeout_ms = 500
                canary_percent = 50
                canary_bake_ms = 600000
                """)
        }
        let daemon = try TestDaemon(config: config("builtin = \"whoami\""))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "c")
        let clients = try Traffic.clients(32, on: .loopbackV4)
        let live = LiveFlows(clients, first: try Whoami.ask(clients, to: destination))
        try daemon.rewriteConfig(config("exec = [\"/bin/sleep\", \"3600\"]"))
        let reload = try daemon.request(ControlRequest(command: .reload))
        #expect(reload.ok, "\(reload)")
        _ = try daemon.waitFor("the canary bakes", timeoutMs: 60_000) { services in
            live.round(to: destination)
            return services[0].upgrade?.bakeEndsNs != nil
        }
        // New flows, half of them the canary's, sent without waiting for answers that never come.
        let senders = try Traffic.clients(300, on: .loopbackV4)
        let rolled = try daemon.waitFor("the canary rolled back for its drops", timeoutMs: 60_000) { services in
            for sender in senders { try? sender.send(Array("drop me".utf8), to: destination) }
            live.round(to: destination)
            return services[0].upgrade?.phase == .rolledBack
        }
        let upgrade = try #require(rolled[0].upgrade)
        let reason = upgrade.reason ?? ""
        #expect(reason.hasPrefix("automatic, during the bake: generation 2's sockets dropped "), "\(reason)")
        #expect(reason.contains("percentage points above; its live flows stay on it until idle"), "\(reason)")
        let traffic = Dictionary(uniqueKeysWithValues: (upgrade.bakeTraffic ?? []).map { ($0.generation, $0) })
        let canary = try #require(traffic[2], "\(upgrade)")
        #expect(canary.packets >= 200 && canary.drops * 2 > canary.packets, "\(canary)")
        #expect(traffic[1].map { $0.packets > 0 } == true, "\(upgrade)")
        #expect(upgrade.comparison?.contains("kernel drops in") == true, "\(upgrade)")
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost")
        #expect(daemon.stop() == 0)
    }

    /// A reload that would change the workers during a bake (here, their program) is refused,
    /// naming the canary, its bake's time left and what to do; the canary bakes on, no live
    /// flow moves, and it is promoted as usual. SIGHUP is refused in the same words.
    @Test func aReloadDuringTheBakeIsRefusedAndTheCanaryBakesOn() throws {
        func config(_ builtin: String) -> String {
            serviceTable("c", workers: 2, program: "builtin = \"\(builtin)\"", extra: "flow_idle_timeout_ms = 500")
        }
        let daemon = try TestDaemon(config: config("whoami"))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "c")
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let live = LiveFlows(clients, first: try Whoami.ask(clients, to: destination))
        let started = try daemon.request(.canary(service: "c", percent: 25, bakeMs: 600_000))
        #expect(started.ok, "\(started)")
        let baking = try daemon.waitFor("the canary bakes") { services in
            live.round(to: destination)
            return services[0].upgrade?.bakeEndsNs != nil
        }
        let canary = try #require(baking[0].upgrade)
        try daemon.rewriteConfig(config("echo"))
        let reload = try daemon.request(ControlRequest(command: .reload))
        #expect(!reload.ok)
        let refusal = reload.error ?? ""
        let expected = #/the configuration cannot be applied while a canary bakes, nothing changed: c: generation 2 is a canary of 25% beside generation 1 and its bake ends in (\d+) s; the new configuration changes its worker definition\. End the canary first \(reuseportctl upgrade --promote, or reuseportctl upgrade --rollback\), then reload/#
        let left = try #require(refusal.wholeMatch(of: expected), "\(refusal)").1
        #expect((500...600).contains(Int(left) ?? 0), "\(refusal)")
        kill(daemon.pid, SIGHUP)
        _ = try daemon.waitFor("SIGHUP's refusal logged") { _ in
            live.round(to: destination)
            return daemon.log.contains("reload (SIGHUP): the configuration cannot be applied while a canary bakes, "
                + "nothing changed: c: generation 2 is a canary of 25% beside generation 1 and its bake ends in ")
        }
        let after = try daemon.waitFor("a check of the bake after the reload") { services in
            live.round(to: destination)
            return services[0].upgrade?.comparison != nil
        }
        let still = try #require(after[0].upgrade)
        #expect(still.phase == .canary && still.bakeEndsNs == canary.bakeEndsNs && still.slots == canary.slots
                && still.canaryBuckets == canary.canaryBuckets, "\(still)")
        #expect(after[0].slots.map(\.pid) == baking[0].slots.map(\.pid), "no worker replaced")
        // The canary still runs whoami (the refused file said echo): promoted, every new flow answers.
        let promoted = try daemon.request(.canary(service: "c", promote: true))
        #expect(promoted.ok, "\(promoted)")
        _ = try daemon.waitFor("the canary promoted and switched") { services in
            live.round(to: destination)
            return services[0].upgrade?.phase == .switched
        }
        live.round(to: destination)
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost in \(live.rounds) rounds")
        let fresh = try Traffic.clients(50, on: .loopbackV4)
        #expect(try Whoami.ask(fresh, to: destination).allSatisfy { $0 != nil })
        #expect(daemon.stop() == 0)
    }

    /// `upgrade --watch` follows a canary started elsewhere to its end: a line at each change
    /// (the phase, each generation's buckets, workers and packets, the bake's time left), exit
    /// status 0 once promoted, 1 once rolled back, with the reason.
    @Test(arguments: [(0, Int32(0)), (3, Int32(1))])
    func watchFollowsACanaryToItsEnd(gate: Int, exitStatus: Int32) throws {
        let (daemon, destination, live) = try Self.gatedCanary(exiting: gate, bakeMs: 1500)
        let locations = ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory]
        let ctl = BuiltProducts.path("reuseportctl")
        let nothing = try Subprocess.run(ctl, ["upgrade", "--watch"] + locations, captureStandardError: true)
        #expect(nothing.status == .exited(1) && nothing.errors.contains("c has had no upgrade since the daemon started"),
                "\(nothing)")
        let started = try daemon.request(ControlRequest(command: .upgrade, service: "c"))
        #expect(started.ok, "\(started)")
        let watch = try Subprocess(ctl, ["upgrade", "--watch", "--timeout", "120"] + locations,
                                   captureStandardError: true)
        var status: WaitStatus?
        let deadline = MonotonicClock.milliseconds() + 120_000
        while status == nil, MonotonicClock.milliseconds() < deadline {
            live.round(to: destination)
            status = watch.wait(timeoutMs: 200)
        }
        let output = watch.text
        let errors = String(decoding: watch.errorBytes, as: UTF8.self)
        #expect(status == .exited(exitStatus), "\(String(describing: status))\n\(output)\n\(errors)")
        let lines = output.split(separator: "\n").map(String.init)
        #expect(lines.contains { $0.hasPrefix("c: generation 2 canary (from 1, slots 2,3); canary 50% = 2048 buckets, bake ends in ")
            && $0.contains(" | generation 2 2048 buckets (50.0%), 2 workers, ")
            && $0.contains("; generation 1 2048 buckets (50.0%), 2 workers, ") }, "\(output)")
        // Each generation's packets, then its live flows (the records of its slots).
        #expect(lines.contains { $0.contains(" | ") && $0.hasSuffix(" flows")
            && $0.components(separatedBy: " flows").count == 3 }, "\(output)")
        if exitStatus == 0 {
            #expect(lines.last == "c: generation 2 works; generation 1 drains", "\(output)")
        } else {
            #expect(errors.contains("c: generation 2's canary was rolled back: the gate (/bin/sh -c exit 3) exited with status 3"),
                    "\(errors)")
        }
        // A watch of an upgrade that already ended reports it, with the same exit status.
        let again = try Subprocess.run(ctl, ["upgrade", "--watch"] + locations, captureStandardError: true)
        #expect(again.status == .exited(exitStatus), "\(again)")
        #expect(live.moved == 0 && live.lost == 0, "live flows: \(live.moved) moved, \(live.lost) lost")
        #expect(daemon.stop() == 0)
    }
}
