#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// A canary that bakes while the daemon is replaced (its own `reexec`, or SIGKILL and a new
/// daemon on the same pins): the new daemon resumes it from the records (rp_canary), with the
/// bake's time left, and no live flow moves or is lost, on the working generation or on the
/// canary, through the restart and the promotion (or the rollback) that ends the bake.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct CanaryResumeTests {
    enum Restart: String, CustomStringConvertible {
        case reexec, kill
        var description: String { rawValue }
    }

    static func config(gate: Int?) -> String {
        serviceTable("c", workers: 2, extra: """
            flow_idle_timeout_ms = 1000
            canary_percent = 25
            canary_bake_ms = 20000
            """ + (gate.map { "\ncanary_gate = [\"/bin/sh\", \"-c\", \"exit \($0)\"]" } ?? ""))
    }

    /// Sends rounds of every session until `condition` holds for the daemon's status, or fails
    /// after `timeoutMs`.
    static func rounds(_ sessions: [Sessions], to destination: SocketAddress, daemon: TestDaemon, _ what: String,
                       timeoutMs: Int = 60_000, until condition: ([ServiceStatus]) -> Bool) throws -> [ServiceStatus] {
        let deadline = MonotonicClock.milliseconds() + timeoutMs
        while MonotonicClock.milliseconds() < deadline {
            for session in sessions { try session.run(2, to: destination) }
            if let services = try? daemon.request(ControlRequest(command: .status)).services, condition(services) {
                return services
            }
        }
        throw HarnessError("\(what): not within \(timeoutMs) ms")
    }

    /// Replaces `first` as `restart` says while `sessions` send: its own exec (the same process,
    /// returned as it is), or SIGKILL, 1 s without a daemon, and a new daemon on the same pins
    /// (returned second, to be kept alive). Returns once the daemon serving has every slot running.
    static func replace(_ first: TestDaemon, _ restart: Restart, config: String, under sessions: [Sessions],
                        to destination: SocketAddress) throws -> (TestDaemon, TestDaemon?) {
        switch restart {
        case .reexec:
            let before = try first.request(ControlRequest(command: .status)).daemon?.startedAtNs
            let answer = try first.request(ControlRequest(command: .reexec))
            #expect(answer.ok, "\(answer)")
            _ = try rounds(sessions, to: destination, daemon: first, "the new image") { _ in
                (try? first.request(ControlRequest(command: .status)).daemon?.startedAtNs) != before
            }
            return (first, nil)
        case .kill:
            first.signal(SIGKILL)
            #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
            // With no daemon, map dump shows the canary as the records keep it.
            let locations = ["--pin-dir", first.pinRoot, "--run-dir", first.runDirectory]
            let dump = try Subprocess.run(BuiltProducts.path("reuseportctl"), ["map", "dump"] + locations).output
            #expect(dump.contains("upgrade    generation 2 canary (from 1, slots 2,3; pinned, no daemon answers); "
                + "canary 25% = 1024 buckets, "), "\(dump)")
            // --json shows the same canary, from the same pins.
            let json = try Subprocess.run(BuiltProducts.path("reuseportctl"), ["map", "dump", "--json"] + locations).output
            let services = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])["services"]
            let canary = try #require(((services as? [[String: Any]])?.first)?["pinned_canary"] as? [String: Any], "\(json)")
            #expect(canary["generation"] as? Int == 2 && canary["previous"] as? Int == 1, "\(canary)")
            #expect(canary["percent"] as? Int == 25 && canary["buckets"] as? Int == 1024, "\(canary)")
            #expect(canary["slots"] as? [Int] == [2, 3], "\(canary)")
            // Learning, baking, or with the gate running when the daemon died; the bake's end once it began.
            let phase = try #require(canary["phase"] as? String)
            #expect(["learning", "baking", "gate"].contains(phase), "\(canary)")
            #expect((canary["bake_ends_ns"] is NSNull) == (phase == "learning"), "\(canary)")
            #expect((canary["bake_seconds_left"] is NSNull) == (phase == "learning"), "\(canary)")
            #expect(canary["gate_running"] as? Bool == (phase == "gate"), "\(canary)")
            for session in sessions { try session.run(5, to: destination) }
            let second = try TestDaemon(config: config, pinRoot: first.pinRoot)
            _ = try rounds(sessions, to: destination, daemon: second, "the new daemon's workers") {
                $0.first?.slots.allSatisfy { $0.state == "running" } == true
            }
            return (second, second)
        }
    }

    /// A canary of 25% with a bake of 20 s; 64 flows on generation 1 and 64 started once it bakes
    /// (some of them on the canary) send every 100 ms throughout. The daemon is replaced during
    /// the bake; the new one says it resumed the canary, shows the bake's time left (what was
    /// left, less the time it took), and at its end promotes the canary (no gate), or runs the
    /// gate again, which rolls it back (status 3). Every datagram is answered by the worker
    /// that answered the flow's first.
    @Test(arguments: [(Restart.reexec, nil), (.kill, nil), (.reexec, 3), (.kill, 3)] as [(Restart, Int?)])
    func aBakingCanarySurvivesTheDaemonsRestart(restart: Restart, gate: Int?) throws {
        let first = try TestDaemon(config: Self.config(gate: gate))
        let before = try first.waitForWorkers()
        let destination = try udpEndpoint(before, "c")
        let working = try Sessions(64, periodMs: 100)
        try working.run(3, to: destination)
        let started = try first.request(.canary(service: "c", percent: 25, bakeMs: 20_000))
        #expect(started.ok, "\(started)")
        let baking = try Self.rounds([working], to: destination, daemon: first, "the canary bakes") {
            $0[0].upgrade?.bakeEndsNs != nil
        }
        let canary = try #require(baking[0].upgrade)
        let endsNs = try #require(canary.bakeEndsNs)
        let canaryPids = Set(baking[0].slots.filter { $0.generation == canary.generation }.compactMap(\.pid))
        let onCanary = try Sessions(64, periodMs: 100)
        try onCanary.run(3, to: destination)
        let sessions = [working, onCanary]

        let (daemon, second) = try Self.replace(first, restart, config: Self.config(gate: gate), under: sessions,
                                                to: destination)
        let resumed = try daemon.request(ControlRequest(command: .status)).services ?? []
        let upgrade = try #require(resumed.first?.upgrade, "the new daemon knows no upgrade: \(resumed)")
        #expect(upgrade.phase == .canary && upgrade.generation == canary.generation
                && upgrade.canaryPercent == 25 && upgrade.canaryBuckets == canary.canaryBuckets, "\(upgrade)")
        // The bake goes on where it was: it ends when it would have (within a check's second).
        let resumedEnd = try #require(upgrade.bakeEndsNs, "\(upgrade)")
        #expect(abs(Int64(resumedEnd) - Int64(endsNs)) < 2_000_000_000, "bake ended at \(endsNs), now \(resumedEnd)")
        #expect(Set(resumed[0].slots.filter { $0.generation == canary.generation }.compactMap(\.pid)) == canaryPids,
                "the canary's workers were adopted")
        #expect(daemon.log.contains("generation \(canary.generation): resumed the canary of 25%"), "\(daemon.log)")
        let locations = ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory]
        let dump = try Subprocess.run(BuiltProducts.path("reuseportctl"), ["map", "dump"] + locations).output
        #expect(dump.contains("generation 2 canary (from 1, slots "), "\(dump)")
        #expect(dump.contains("canary 25% = \(canary.canaryBuckets ?? 0) buckets, bake ends in"), "\(dump)")

        let phase: UpgradeStatus.Phase = gate == nil ? .switched : .rolledBack
        let ended = try Self.rounds(sessions, to: destination, daemon: daemon, "the bake's end", timeoutMs: 90_000) {
            $0[0].upgrade?.phase == phase
        }
        let reason = ended[0].upgrade?.reason ?? ""
        if gate == nil {
            #expect(reason.hasPrefix("promoted: the bake of 20000 ms passed"), "\(reason)")
        } else {
            #expect(reason.hasPrefix("the gate (/bin/sh -c exit 3) exited with status 3 after the bake"), "\(reason)")
        }
        for session in sessions { try session.run(5, to: destination) }
        print("canary across \(restart) (gate \(gate.map(String.init) ?? "none")): working flows \(working.report); "
            + "flows started during the bake \(onCanary.report)")
        #expect(working.lost == 0 && working.moved.isEmpty, "flows on generation 1: \(working.report)")
        #expect(onCanary.lost == 0 && onCanary.moved.isEmpty, "flows started during the bake: \(onCanary.report)")
        #expect(onCanary.answers.contains { $0.contains { label in canaryPids.contains { label.hasSuffix("/\($0)") } } },
                "some flows were the canary's")
        #expect(daemon.stop() == 0)
        #expect(!PinLayout(root: daemon.pinRoot, service: "c").exists, "a graceful stop leaves no pin, the canary's neither")
        withExtendedLifetime((first, second)) {}
    }

    static func config(bakeMs: Int, idleMs: Int = 1000, gate: String? = nil) -> String {
        serviceTable("c", workers: 2, extra: """
            flow_idle_timeout_ms = \(idleMs)
            canary_percent = 25
            canary_bake_ms = \(bakeMs)
            """ + (gate.map { "\ncanary_gate = [\"/bin/sh\", \"-c\", \"\($0)\"]" } ?? ""))
    }

    /// A daemon of `config` with 64 flows on generation 1 sending every 100 ms; a canary started
    /// (the configuration's percent and bake), the flows sending until `condition` holds.
    static func canary(_ config: String, until what: String, _ condition: @escaping ([ServiceStatus]) -> Bool) throws
        -> (TestDaemon, SocketAddress, Sessions, [ServiceStatus])
    {
        let first = try TestDaemon(config: config)
        let destination = try udpEndpoint(try first.waitForWorkers(), "c")
        let working = try Sessions(64, periodMs: 100)
        try working.run(3, to: destination)
        let started = try first.request(.canary(service: "c"))
        #expect(started.ok, "\(started)")
        let services = try rounds([working], to: destination, daemon: first, what, until: condition)
        return (first, destination, working, services)
    }

    /// `canary(config)` until the canary bakes, then 64 more flows (some of them the canary's).
    static func baking(_ config: String) throws -> (TestDaemon, SocketAddress, Sessions, Sessions) {
        let (first, destination, working, _) = try canary(config, until: "the canary bakes") {
            $0[0].upgrade?.bakeEndsNs != nil
        }
        let onCanary = try Sessions(64, periodMs: 100)
        try onCanary.run(3, to: destination)
        return (first, destination, working, onCanary)
    }

    /// A resumed canary is ended by hand as any: promoted after a reexec, rolled back after a
    /// kill, long before its bake (10 min) would end. No live flow moves.
    @Test(arguments: [(Restart.reexec, true), (.kill, false)])
    func aResumedCanaryIsPromotedOrRolledBackByHand(restart: Restart, promote: Bool) throws {
        let config = Self.config(bakeMs: 600_000)
        let (first, destination, working, onCanary) = try Self.baking(config)
        let sessions = [working, onCanary]
        let (daemon, second) = try Self.replace(first, restart, config: config, under: sessions, to: destination)
        let resumed = try daemon.request(ControlRequest(command: .status)).services?.first?.upgrade
        #expect(resumed?.phase == .canary, "\(String(describing: resumed))")
        let answer = promote ? try daemon.request(.canary(service: "c", promote: true))
            : try daemon.request(ControlRequest(command: .upgrade, service: "c", rollback: true))
        #expect(answer.ok, "\(answer)")
        let phase: UpgradeStatus.Phase = promote ? .switched : .rolledBack
        let ended = try Self.rounds(sessions, to: destination, daemon: daemon, "the canary ended by hand") {
            $0[0].upgrade?.phase == phase
        }
        #expect(ended[0].upgrade?.reason?.hasPrefix(promote ? "promoted: asked" : "asked") == true,
                "\(String(describing: ended[0].upgrade))")
        for session in sessions { try session.run(5, to: destination) }
        #expect(working.lost == 0 && working.moved.isEmpty, "flows on generation 1: \(working.report)")
        #expect(onCanary.lost == 0 && onCanary.moved.isEmpty, "flows started during the bake: \(onCanary.report)")
        #expect(daemon.stop() == 0)
        withExtendedLifetime((first, second)) {}
    }

    /// A canary whose buckets still learn their live flows (for one flow_idle_timeout_ms, 8 s
    /// here) when the daemon is killed: the new daemon resumes it learning; its buckets switch at
    /// the time the first daemon set, the bake (3 s) follows, and it is promoted. No flow moves.
    @Test func aLearningCanaryIsResumedLearning() throws {
        let config = Self.config(bakeMs: 3000, idleMs: 8000)
        let (first, destination, working, _) = try Self.canary(config, until: "the canary learns") {
            $0[0].upgrade?.phase == .canary && $0[0].upgrade?.canaryBuckets != nil
        }
        let (daemon, second) = try Self.replace(first, .kill, config: config, under: [working], to: destination)
        let resumed = try #require(try daemon.request(ControlRequest(command: .status)).services?.first?.upgrade)
        #expect(resumed.phase == .canary && resumed.bakeEndsNs == nil && resumed.canaryBuckets == 1024, "\(resumed)")
        #expect(daemon.log.contains("its buckets learn their live flows, then its bake of 3000 ms begins"), "\(daemon.log)")
        let ended = try Self.rounds([working], to: destination, daemon: daemon, "promoted", timeoutMs: 90_000) {
            $0[0].upgrade?.phase == .switched
        }
        #expect(ended[0].upgrade?.reason?.hasPrefix("promoted: the bake of 3000 ms passed") == true,
                "\(String(describing: ended[0].upgrade))")
        try working.run(5, to: destination)
        #expect(working.lost == 0 && working.moved.isEmpty, "\(working.report)")
        #expect(daemon.stop() == 0)
        withExtendedLifetime((first, second)) {}
    }

    /// The daemon is killed while the gate runs (it sleeps 3 s, then says 0): the new daemon finds
    /// the bake over, runs the gate again, and its verdict promotes the canary.
    @Test func aGateThatRanWhenTheDaemonDiedRunsAgain() throws {
        let config = Self.config(bakeMs: 1000, gate: "sleep 3; exit 0")
        let (first, destination, working, _) = try Self.canary(config, until: "the canary bakes") {
            $0[0].upgrade?.bakeEndsNs != nil
        }
        _ = try Self.rounds([working], to: destination, daemon: first, "the gate runs") { _ in
            first.log.contains("the bake passed; the gate decides: /bin/sh -c sleep 3; exit 0")
        }
        let (daemon, second) = try Self.replace(first, .kill, config: config, under: [working], to: destination)
        #expect(daemon.log.contains("its bake was over and the gate running: the gate runs again"), "\(daemon.log)")
        let ended = try Self.rounds([working], to: destination, daemon: daemon, "promoted by the gate") {
            $0[0].upgrade?.phase == .switched
        }
        #expect(ended[0].upgrade?.reason == "promoted: the bake passed and the gate (/bin/sh -c sleep 3; exit 0) exited "
            + "with status 0", "\(String(describing: ended[0].upgrade))")
        try working.run(5, to: destination)
        #expect(working.lost == 0 && working.moved.isEmpty, "\(working.report)")
        #expect(daemon.stop() == 0)
        withExtendedLifetime((first, second)) {}
    }

    /// In sequence: a canary resumed twice (SIGKILL and a new daemon, then that daemon's own
    /// reexec), promoted by hand, then a scale to 3 workers and a graceful stop. No live flow
    /// moves or is lost at any step, and the stop leaves no pin.
    @Test func aCanaryThroughAKillAReexecAPromotionAScaleAndAStop() throws {
        let config = Self.config(bakeMs: 600_000)
        let (first, destination, working, onCanary) = try Self.baking(config)
        let sessions = [working, onCanary]
        let (second, kept) = try Self.replace(first, .kill, config: config, under: sessions, to: destination)
        let (daemon, _) = try Self.replace(second, .reexec, config: config, under: sessions, to: destination)
        let resumed = try daemon.request(ControlRequest(command: .status)).services?.first?.upgrade
        #expect(resumed?.phase == .canary && resumed?.canaryBuckets == 1024, "\(String(describing: resumed))")
        #expect(daemon.log.components(separatedBy: "resumed the canary of 25%").count == 3, "resumed twice")
        #expect(try daemon.request(.canary(service: "c", promote: true)).ok)
        _ = try Self.rounds(sessions, to: destination, daemon: daemon, "promoted") { $0[0].upgrade?.phase == .switched }
        let scaled = try daemon.request(ControlRequest(command: .scale, service: "c", workers: 3))
        #expect(scaled.ok, "\(scaled)")
        // Generation 1's slots drain meanwhile: its live flows keep them (they never idle here).
        _ = try Self.rounds(sessions, to: destination, daemon: daemon, "3 workers of generation 2") { services in
            services[0].slots.filter { $0.generation == 2 && $0.state == "running" }.count == 3
        }
        for session in sessions { try session.run(5, to: destination) }
        #expect(working.lost == 0 && working.moved.isEmpty, "flows on generation 1: \(working.report)")
        #expect(onCanary.lost == 0 && onCanary.moved.isEmpty, "flows started during the bake: \(onCanary.report)")
        #expect(daemon.stop() == 0)
        #expect(!PinLayout(root: daemon.pinRoot, service: "c").exists)
        withExtendedLifetime((first, kept)) {}
    }
}
