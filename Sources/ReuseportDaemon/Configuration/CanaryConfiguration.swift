import ReuseportKit
import TOMLKit

/// How a service's upgrades go when they go as canaries (`canary_percent`, `canary_bake_ms`,
/// `canary_gate`; docs/configuration.md, "Canary generations"), or as `reuseportctl upgrade
/// --canary` asks.
public struct CanarySettings: Sendable, Equatable, Codable {
    /// The share of the buckets whose new flows go to the new generation while it bakes.
    public var percent: Int
    public var bakeMs: Int
    /// Run as the service's user at the end of the bake: exit status 0 promotes, any other
    /// rolls back. Nil: the daemon's own comparison decides alone.
    public var gate: [String]?

    public static let defaultBakeMs = 300_000
    /// At most a week.
    public static let bakeRange = 0...604_800_000
    /// How often the bake is checked.
    public static let checkIntervalNs: Int64 = 250_000_000
    /// A gate still running this long after the bake is stopped (SIGKILL), and the canary rolled back.
    public static let gateTimeoutMs = 60_000
    /// A canary whose sockets drop more than this share of its packets above the working
    /// generation's share fails the bake (1 percentage point: a queue that overflows now and
    /// then under a burst is not a failure; a worker that stopped reading drops nearly all).
    public static let dropsMargin = 0.01
    /// Packets the canary must have been sent before its drops are compared.
    public static let dropsMinimumPackets = 200

    public init(percent: Int, bakeMs: Int = CanarySettings.defaultBakeMs, gate: [String]? = nil) {
        self.percent = percent
        self.bakeMs = bakeMs
        self.gate = gate
    }
}

extension ConfigurationParser {
    /// The canary keys of a `[[service]]`; nil when `canary_percent` is not set.
    static func parseCanary(_ reader: TableReader) throws(ConfigurationError) -> CanarySettings? {
        let percent = try reader.integer("canary_percent")
        let bake = try reader.integer("canary_bake_ms")
        let gate = try reader.strings("canary_gate")
        guard let percent else {
            if bake != nil { throw reader.error("canary_bake_ms", "needs canary_percent (upgrades are canaries only with it)") }
            if gate != nil { throw reader.error("canary_gate", "needs canary_percent (upgrades are canaries only with it)") }
            return nil
        }
        guard CanaryPlacement.percentRange.contains(percent) else {
            throw reader.error("canary_percent", "must be between 1 and 99 (percent of the buckets), got \(percent)")
        }
        var settings = CanarySettings(percent: percent)
        if let bake {
            guard CanarySettings.bakeRange.contains(bake) else {
                throw reader.error("canary_bake_ms", "must be between 0 and \(CanarySettings.bakeRange.upperBound) "
                    + "milliseconds, got \(bake)")
            }
            settings.bakeMs = bake
        }
        if let gate {
            guard let program = gate.first, !program.isEmpty else {
                throw reader.error("canary_gate", "must name a program, e.g. [\"/usr/local/bin/check-canary\", \"dns\"]")
            }
            settings.gate = gate
        }
        return settings
    }
}
