#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import Testing

/// A canary that bakes while the daemon is replaced (its own `reexec`, or SIGKILL and a new
/// daemon on the same pins): the new daemon resumes it from the records (rp_canary), with the
/// bake's time left, and no live flow moves or is lost, on the working generation or on the
/// canary, through the restart and the promotion (or the rollback) that ends the bake.
@Suite(.serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
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

        var daemon = first
        var second: TestDaemon?
        switch restart {
        case .reexec:
            let before = try first.request(ControlRequest(command: .status)).daemon?.startedAtNs
            _ = try first.request(ControlRequest(command: .reexec))
            _ = try Self.rounds(sessions, to: destination, daemon: first, "the new image") { _ in
                (try? first.request(ControlRequest(command: .status)).daemon?.startedAtNs) != before
            }
        case .kill:
            first.signal(SIGKILL)
            #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
            try working.run(5, to: destination)
            try onCanary.run(5, to: destination)
            second = try TestDaemon(config: Self.config(gate: gate), pinRoot: first.pinRoot)
            daemon = try #require(second)
            _ = try Self.rounds(sessions, to: destination, daemon: daemon, "the new daemon's workers") {
                $0.first?.slots.allSatisfy { $0.state == "running" } == true
            }
        }
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
        withExtendedLifetime(first) {}
    }
}
