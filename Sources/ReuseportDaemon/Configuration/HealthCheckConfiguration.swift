import ReuseportKit
import TOMLKit

/// `[service.health_check]`: what the daemon sends to each worker through the shared port, and
/// what a healthy answer looks like (docs/configuration.md, "Active health checks").
public struct HealthCheckSettings: Sendable, Equatable, Codable {
    /// The probe's payload: a datagram (UDP), or the bytes sent once connected (TCP).
    public var payload: [UInt8]
    /// A healthy answer starts with these bytes (empty: any prefix).
    public var expectPrefix: [UInt8] = []
    /// ... and, when set, matches this regular expression (on the answer read as UTF-8).
    public var expectRegex: String?
    public var intervalMs = 1000
    public var timeoutMs = 500
    /// Failed probes in a row before the worker is unhealthy and restarted.
    public var failures = 3
    /// The listener the probes go to: the service's first of this transport.
    public var transport: Transport

    public static let minimumIntervalMs = 100
    public static let failuresRange = 1...100

    /// Whether `reply` is a healthy answer.
    public func accepts(_ reply: [UInt8]) -> Bool {
        guard reply.starts(with: expectPrefix) else { return false }
        guard let expectRegex else { return true }
        guard let regex = try? Regex(expectRegex) else { return false }
        return String(decoding: reply, as: UTF8.self).contains(regex)
    }

    /// The most probes a service sends in a second: one per slot per interval, and never more
    /// than `maxProbesPerSecond` (the interval stretches with the slot count: `effectiveIntervalMs`).
    public static let maxProbesPerSecond = 100

    /// The interval each slot is probed at for `slots` slots: `intervalMs`, stretched so that
    /// the service sends at most `maxProbesPerSecond` probes a second.
    public func effectiveIntervalMs(slots: Int) -> Int {
        max(intervalMs, (slots * 1000 + Self.maxProbesPerSecond - 1) / Self.maxProbesPerSecond)
    }

    /// How long a worker that stopped answering takes to be found unhealthy, at most.
    public func detectionBoundMs(slots: Int) -> Int { effectiveIntervalMs(slots: slots) * failures + timeoutMs }
}

extension ConfigurationParser {
    static let healthCheckKeys = ["send", "send_hex", "expect", "expect_hex", "expect_regex", "interval_ms",
                                  "timeout_ms", "failures", "transport"]

    /// `[service.health_check]`; nil when the service has none.
    static func parseHealthCheck(_ service: TableReader, listen: [Endpoint]) throws(ConfigurationError)
        -> HealthCheckSettings?
    {
        guard let value = service.table["health_check"] else { return nil }
        guard let table = value.table else {
            throw service.error("health_check", "must be a table ([service.health_check]), not \(value.type)")
        }
        let reader = TableReader(table: table, path: service.key("health_check"), file: service.file)
        try reader.rejectUnknown(healthCheckKeys)
        let transport: Transport
        if let name = try reader.string("transport") {
            guard let chosen = Transport(rawValue: name) else {
                throw reader.error("transport", "'\(name)' is not a transport: use \"udp\" or \"tcp\"")
            }
            guard listen.contains(where: { $0.transport == chosen }) else {
                throw reader.error("transport", "the service has no \(name):// listener to probe")
            }
            transport = chosen
        } else {
            transport = listen.first?.transport ?? .udp
        }
        let payload = try bytes(reader, text: "send", hex: "send_hex")
        guard let payload, !payload.isEmpty || transport == .tcp else {
            throw reader.error("send", "is required (or send_hex): the probe's payload, e.g. send = \"ping\"")
        }
        var settings = HealthCheckSettings(payload: payload, transport: transport)
        settings.expectPrefix = try bytes(reader, text: "expect", hex: "expect_hex") ?? []
        if let pattern = try reader.string("expect_regex") {
            do {
                _ = try Regex(pattern)
            } catch {
                throw reader.error("expect_regex", "'\(pattern)' is not a regular expression: \(error)")
            }
            settings.expectRegex = pattern
        }
        settings.intervalMs = try reader.milliseconds("interval_ms") ?? settings.intervalMs
        guard settings.intervalMs >= HealthCheckSettings.minimumIntervalMs else {
            throw reader.error("interval_ms", "must be at least \(HealthCheckSettings.minimumIntervalMs) milliseconds, "
                + "got \(settings.intervalMs)")
        }
        settings.timeoutMs = try reader.milliseconds("timeout_ms") ?? min(settings.timeoutMs, settings.intervalMs / 2)
        guard settings.timeoutMs >= 1, settings.timeoutMs < settings.intervalMs else {
            throw reader.error("timeout_ms", "must be at least 1 and below interval_ms (\(settings.intervalMs)), got "
                + "\(settings.timeoutMs): one probe per slot is in flight at a time")
        }
        settings.failures = try reader.integer("failures") ?? settings.failures
        guard HealthCheckSettings.failuresRange.contains(settings.failures) else {
            throw reader.error("failures", "must be between \(HealthCheckSettings.failuresRange.lowerBound) and "
                + "\(HealthCheckSettings.failuresRange.upperBound), got \(settings.failures)")
        }
        return settings
    }

    /// Bytes given as text (`text`) or as hex (`hex`), not both.
    private static func bytes(_ reader: TableReader, text: String, hex: String) throws(ConfigurationError) -> [UInt8]? {
        let plain = try reader.string(text)
        let coded = try reader.string(hex)
        if plain != nil, coded != nil {
            throw reader.error(hex, "give \(text) or \(hex), not both")
        }
        if let plain { return Array(plain.utf8) }
        guard let coded else { return nil }
        let digits = coded.filter { !$0.isWhitespace }
        guard let octets = QuicSteering.octets(hex: digits) else {
            throw reader.error(hex, "'\(coded)' is not hex octets (e.g. \"12340100\", spaces allowed)")
        }
        return octets
    }
}
