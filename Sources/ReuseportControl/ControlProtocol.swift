import Foundation
import ReuseportKit

/// The control socket protocol between reuseportd and reuseportctl.
///
/// A SOCK_STREAM Unix socket (default `/run/reuseportd/control.sock`, mode 0600, peer
/// credentials checked by the daemon). The client sends one request as one line of JSON
/// and reads one response line of JSON; then either side closes. Read-only views do not
/// use this socket: reuseportctl reads the pinned maps, so it works while the daemon is wedged.
public enum ControlDefaults {
    public static let runDirectory = "/run/reuseportd"
    public static let socketName = "control.sock"
    public static func socketPath(runDirectory: String = runDirectory) -> String { "\(runDirectory)/\(socketName)" }
    /// Longest request line the daemon reads; longer ones are refused.
    public static let maximumRequestBytes = 64 * 1024
}

/// What a client asks. Encoded as `{"command": "...", ...}`.
public struct ControlRequest: Codable, Sendable, Equatable {
    public enum Command: String, Codable, Sendable {
        /// Per-service, per-slot worker state as the daemon sees it.
        case status
        /// Restart the worker of `slot` in `service` (its socket and flows stay).
        case restart
        /// Change the worker count of `service` to `workers`, moving the fewest buckets.
        case scale
        /// Re-read the configuration file (as SIGHUP does).
        case reload
    }

    public var command: Command
    public var service: String?
    public var slot: UInt32?
    public var workers: Int?

    public init(command: Command, service: String? = nil, slot: UInt32? = nil, workers: Int? = nil) {
        self.command = command
        self.service = service
        self.slot = slot
        self.workers = workers
    }
}

/// What the daemon answers. `ok == false` carries `error`, a sentence naming what is wrong.
public struct ControlResponse: Codable, Sendable, Equatable {
    public var ok: Bool
    public var error: String?
    /// A one-line summary of what was done ("restarted slot 2 of demo").
    public var message: String?
    public var services: [ServiceStatus]?

    public init(ok: Bool, error: String? = nil, message: String? = nil, services: [ServiceStatus]? = nil) {
        self.ok = ok
        self.error = error
        self.message = message
        self.services = services
    }

    public static func failure(_ error: String) -> ControlResponse { ControlResponse(ok: false, error: error) }
}

public struct ServiceStatus: Codable, Sendable, Equatable {
    public var name: String
    public var listeners: [String]
    public var workers: Int
    public var pinDirectory: String
    public var slots: [SlotStatus]
    /// How many times a slot of this service has been failed over since the daemon started
    /// (its buckets pointed at live slots after being down for `failover_after_ms`).
    /// Optional so that older daemons' answers still decode.
    public var failovers: Int?

    public init(name: String, listeners: [String], workers: Int, pinDirectory: String, slots: [SlotStatus],
                failovers: Int? = nil) {
        self.name = name
        self.listeners = listeners
        self.workers = workers
        self.pinDirectory = pinDirectory
        self.slots = slots
        self.failovers = failovers
    }
}

public struct SlotStatus: Codable, Sendable, Equatable {
    public var slot: UInt32
    public var pid: Int32?
    /// `WorkerState.description`: starting, running, backoff, failed-over, stopping.
    public var state: String
    public var restarts: Int
    public var buckets: Int

    public init(slot: UInt32, pid: Int32?, state: String, restarts: Int, buckets: Int) {
        self.slot = slot
        self.pid = pid
        self.state = state
        self.restarts = restarts
        self.buckets = buckets
    }
}

/// One JSON value per line, both directions.
public enum ControlFraming {
    public static func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var data = try encoder.encode(value)
        data.append(0x0a)
        return data
    }

    public static func decode<T: Decodable>(_ type: T.Type, from line: Data) throws -> T {
        try JSONDecoder().decode(type, from: line)
    }
}
