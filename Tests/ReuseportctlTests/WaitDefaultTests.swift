#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// `scale` and `upgrade` without `--timeout`, against the real daemon: the wait they default to
/// follows from the service's settings (ready_timeout_ms, flow_idle_timeout_ms, read from the
/// daemon's status), so that a change that takes one idle timeout to switch is waited for and
/// reported as done, not as failed.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct WaitDefaultTests {
    static func daemon(idleMs: Int, workers: Int = 2) throws -> LiveDaemon {
        try LiveDaemon(config: """
            [[service]]
            name = "wait"
            listen = ["udp://127.0.0.1:0"]
            workers = \(workers)
            builtin = "whoami"
            flow_idle_timeout_ms = \(idleMs)

            """)
    }

    /// The wait the command announces: "waiting up to N s for ...".
    static func announcedWait(_ output: String) -> Int? {
        guard let range = output.range(of: #"waiting up to (\d+) s"#, options: .regularExpression) else { return nil }
        return Int(output[range].split(separator: " ")[3])
    }

    /// ready_timeout_ms (30 s by default) + flow_idle_timeout_ms (3 s) + 30 s: the command says
    /// so, waits through the 3 s of learning, and exits 0 once generation 2 works.
    @Test func upgradeWaitsForTheIdleTimeoutByDefault() throws {
        let daemon = try Self.daemon(idleMs: 3000)
        try daemon.waitUntilRunning(2)
        let started = nowMs()
        let upgrade = try reuseportctl(["upgrade"] + daemon.locations)
        let tookMs = nowMs() - started
        #expect(upgrade.status == 0, "\(upgrade)")
        #expect(upgrade.stdout.contains("wait: generation 2 works; generation 1 drains"), "\(upgrade)")
        #expect(Self.announcedWait(upgrade.stdout) == 30 + 3 + 30, "\(upgrade)")
        #expect(upgrade.stdout.contains("ready_timeout_ms 30 s + flow_idle_timeout_ms 3 s + 30 s"), "\(upgrade)")
        #expect(tookMs >= 3000, "the switch comes one flow_idle_timeout_ms after the new workers are ready")
        #expect(try daemon.dump()["slots"].flatMap { $0 as? [[String: Any]] }?.contains {
            $0["generation"] as? Int == 2 && $0["state"] as? String == "running"
        } == true)
    }

    /// The bug itself: with flow_idle_timeout_ms above the old fixed default of 30 s, an upgrade
    /// that switches was reported as failed ("still learning after 30 s", exit 1). It must wait
    /// and exit 0.
    @Test func upgradeOutlastsTheOldFixedThirtySeconds() throws {
        let daemon = try Self.daemon(idleMs: 35_000)
        try daemon.waitUntilRunning(2)
        let started = nowMs()
        let upgrade = try reuseportctl(["upgrade"] + daemon.locations)
        let tookMs = nowMs() - started
        #expect(upgrade.status == 0, "\(upgrade)")
        #expect(upgrade.stdout.contains("wait: generation 2 works; generation 1 drains"), "\(upgrade)")
        #expect(tookMs > 35_000, "it waited for the switch")
    }

    /// `scale` learns the live flows of the buckets that move for one flow_idle_timeout_ms too:
    /// without --timeout it waits flow_idle_timeout_ms + 30 s, and returns once the buckets
    /// switched (the next command, say an upgrade, is then not refused for a change learning).
    @Test func scaleWaitsForTheSwitchByDefault() throws {
        let daemon = try Self.daemon(idleMs: 3000)
        try daemon.waitUntilRunning(2)
        let started = nowMs()
        let scale = try reuseportctl(["scale", "3"] + daemon.locations)
        let tookMs = nowMs() - started
        #expect(scale.status == 0, "\(scale)")
        #expect(Self.announcedWait(scale.stdout) == 3 + 30, "\(scale)")
        #expect(scale.stdout.contains("flow_idle_timeout_ms 3 s + 30 s"), "\(scale)")
        #expect(tookMs >= 2500, "the switch comes one flow_idle_timeout_ms after the scale")
        let service = try daemon.dump()
        let change = try #require(service["change"] as? [String: Any])
        #expect(change["phase"] as? String != "learning", "reuseportctl scale returned before the switch: \(change)")
        #expect(service["slot_count"] as? Int == 3)
        // The change switched: an upgrade is accepted at once.
        let upgrade = try reuseportctl(["upgrade", "--no-wait"] + daemon.locations)
        #expect(upgrade.status == 0, "\(upgrade)")
    }
}
