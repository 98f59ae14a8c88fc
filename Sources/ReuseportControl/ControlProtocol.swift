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
    public enum Command: String, Codable, Sendable, CaseIterable {
        /// Per-service, per-slot worker state as the daemon sees it.
        case status
        /// Restart the worker of `slot` in `service` (its socket and flows stay).
        case restart
        /// Change the worker count of `service` to `workers`, moving the fewest buckets. With flow
        /// tracking the change learns live flows first and leaving slots drain; `now` switches at
        /// once; `dryRun` only says what would move.
        case scale
        /// Re-read the configuration file (as SIGHUP does).
        case reload
        /// Exec the reuseportd binary on disk in the daemon's own process (same pid), which adopts
        /// the workers, their sockets and the maps (as SIGUSR2 does). Answered before the exec.
        case reexec
        /// Start a new generation of `service`'s workers on new slots; the buckets switch to it once
        /// every new worker is ready, and the old generation drains. With `rollback`, make the
        /// generation still draining the working one again.
        case upgrade
    }

    public var command: Command
    public var service: String?
    public var slot: UInt32?
    public var workers: Int?
    /// `scale`: switch at once, without learning or draining (live flows of moving buckets move).
    public var now: Bool?
    /// `scale`: say what the change would move, change nothing.
    public var dryRun: Bool?
    /// `upgrade`: back to the generation still draining, instead of a new one; while a canary
    /// bakes, its buckets go back to the working generation.
    public var rollback: Bool?
    /// `upgrade`: a canary: once ready, the new generation takes the new flows of this percent of
    /// the buckets (1–99) for `bakeMs`, then is promoted or rolled back.
    public var canaryPercent: Int?
    public var bakeMs: Int?
    /// `upgrade`: promote the canary that bakes now.
    public var promote: Bool?

    public init(command: Command, service: String? = nil, slot: UInt32? = nil, workers: Int? = nil,
                now: Bool? = nil, dryRun: Bool? = nil, rollback: Bool? = nil) {
        self.command = command
        self.service = service
        self.slot = slot
        self.workers = workers
        self.now = now
        self.dryRun = dryRun
        self.rollback = rollback
    }

    /// An `upgrade` request for a canary (`percent`, `bakeMs`), or to `promote` the one baking.
    public static func canary(service: String?, percent: Int? = nil, bakeMs: Int? = nil, promote: Bool = false)
        -> ControlRequest
    {
        var request = ControlRequest(command: .upgrade, service: service)
        request.canaryPercent = percent
        request.bakeMs = bakeMs
        request.promote = promote ? true : nil
        return request
    }
}

/// The daemon process that answered, and its image.
public struct DaemonIdentity: Codable, Sendable, Equatable {
    public var pid: Int32
    /// CLOCK_REALTIME, in ns, when this image started (a `reexec` starts a new one in the same pid).
    public var startedAtNs: UInt64
    /// The build this image runs (`BuildVersion`: `reuseportd --version`). Optional: older
    /// daemons do not send it.
    public var version: String?

    public init(pid: Int32, startedAtNs: UInt64, version: String? = nil) {
        self.pid = pid
        self.startedAtNs = startedAtNs
        self.version = version
    }
}

/// What the daemon answers. `ok == false` carries `error`, a sentence naming what is wrong.
public struct ControlResponse: Codable, Sendable, Equatable {
    public var ok: Bool
    public var error: String?
    /// A one-line summary of what was done ("restarted slot 2 of demo").
    public var message: String?
    public var services: [ServiceStatus]?
    /// A `scale` or `restart` that was done but whose new worker could not start on these slots
    /// (each is retried after the restart back-off). Absent when every worker started.
    public var startFailures: [SlotStartFailure]?
    /// `status`: datagrams the notify socket ignored since the daemon started. Optional: older
    /// daemons do not send it.
    public var ignoredNotifications: IgnoredNotifications?
    /// `status`: which daemon answered (its pid, and when this image of it started: an exec in
    /// place keeps the pid and changes the time). Optional: older daemons do not send it.
    public var daemon: DaemonIdentity?

    public init(ok: Bool, error: String? = nil, message: String? = nil, services: [ServiceStatus]? = nil,
                startFailures: [SlotStartFailure]? = nil, ignoredNotifications: IgnoredNotifications? = nil,
                daemon: DaemonIdentity? = nil) {
        self.daemon = daemon
        self.ok = ok
        self.error = error
        self.message = message
        self.services = services
        self.startFailures = startFailures
        self.ignoredNotifications = ignoredNotifications
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
    /// Workers started at once instead of after their back-off because a signal killed the
    /// last one running (every other slot was down). Optional: older daemons do not send it.
    public var rescueStarts: Int?
    /// Datagrams still queued at removed slots' sockets (scale-down) that no worker read: the
    /// worker died, or did not read them within `stop_timeout_ms`. Optional, as above.
    public var removedSlotDrops: Int?
    /// Workers of a previous daemon (killed, crashed, or this one before an exec) taken over with
    /// their sockets when this daemon started, and processes its rows named that were refused
    /// (not provably that slot's worker: never signalled). Optional, as above.
    public var adoptedWorkers: Int?
    public var refusedAdoptions: Int?
    /// The generation taking new flows. Optional, as above.
    public var generation: Int?
    /// The upgrade in progress, or the last one and how it ended. Optional, as above.
    public var upgrade: UpgradeStatus?
    /// Upgrades started, switched (roll backs included) and abandoned since the daemon started.
    public var upgrades: UpgradeCounts?
    /// Workers that left their slot and still run: draining what was queued at its sockets,
    /// holding the TCP connections they accepted, or stopping. Optional, as above.
    public var leaving: [LeavingWorker]?
    /// The settings in force that say how long a scale or an upgrade takes. Optional, as above.
    public var settings: ServiceSettings?
    /// Invariants of the service's placement found broken after an operation (the last few; a
    /// bug if ever not empty: PlacementModel.violations). Optional, as above.
    public var invariantViolations: [String]?

    public init(name: String, listeners: [String], workers: Int, pinDirectory: String, slots: [SlotStatus],
                failovers: Int? = nil, rescueStarts: Int? = nil, removedSlotDrops: Int? = nil,
                adoptedWorkers: Int? = nil, refusedAdoptions: Int? = nil,
                generation: Int? = nil, upgrade: UpgradeStatus? = nil, upgrades: UpgradeCounts? = nil,
                leaving: [LeavingWorker]? = nil, settings: ServiceSettings? = nil,
                invariantViolations: [String]? = nil) {
        self.invariantViolations = invariantViolations
        self.leaving = leaving
        self.settings = settings
        self.adoptedWorkers = adoptedWorkers
        self.refusedAdoptions = refusedAdoptions
        self.generation = generation
        self.upgrade = upgrade
        self.upgrades = upgrades
        self.name = name
        self.listeners = listeners
        self.workers = workers
        self.pinDirectory = pinDirectory
        self.slots = slots
        self.failovers = failovers
        self.rescueStarts = rescueStarts
        self.removedSlotDrops = removedSlotDrops
    }
}

/// A service's settings that say how long its changes take: a scale or an upgrade with flow
/// tracking learns the live flows for one `flowIdleTimeoutMs` before it switches, and an upgrade
/// first waits up to `readyTimeoutMs` for its new workers. `reuseportctl scale` and `upgrade`
/// wait that long by default.
public struct ServiceSettings: Codable, Sendable, Equatable {
    /// Changes learn live flows before they switch (flow tracking on, and a UDP listener).
    public var flowTracking: Bool
    /// `flow_idle_timeout_ms`: how long a change learns.
    public var flowIdleTimeoutMs: Int
    /// `ready_timeout_ms`: how long an upgrade waits for its new workers to be ready.
    public var readyTimeoutMs: Int

    public init(flowTracking: Bool, flowIdleTimeoutMs: Int, readyTimeoutMs: Int) {
        self.flowTracking = flowTracking
        self.flowIdleTimeoutMs = flowIdleTimeoutMs
        self.readyTimeoutMs = readyTimeoutMs
    }
}

/// A worker no longer at its slot that has not exited yet.
public struct LeavingWorker: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable {
        /// Its slot's sockets left the arrays: it reads what was queued there.
        case draining
        /// Of an older generation, with TCP listeners: its listeners closed, it keeps the
        /// connections it accepted until it exits, or until `drain_timeout_ms` after the switch.
        case holding
        /// SIGTERM sent; SIGKILL at `stop_timeout_ms`.
        case stopping
    }

    public var pid: Int32
    public var slot: UInt32
    /// 0 for a previous daemon's worker that could not be adopted.
    public var generation: Int
    public var state: State

    public init(pid: Int32, slot: UInt32, generation: Int, state: State) {
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.state = state
    }
}

public struct SlotStatus: Codable, Sendable, Equatable {
    public var slot: UInt32
    public var pid: Int32?
    /// `WorkerState.description`: starting, running, backoff, failed-over, stopping.
    public var state: String
    public var restarts: Int
    public var buckets: Int
    /// Lines of output of this slot's workers that the daemon did not log (more than its limit
    /// of lines a second), and their bytes, since the daemon started. Optional so that older
    /// daemons' answers still decode.
    public var droppedOutputLines: Int?
    public var droppedOutputBytes: Int?
    /// Workers of this slot stopped (SIGABRT) because they sent no `WATCHDOG=1` within
    /// `watchdog_ms`, since the daemon started. Optional, as above.
    public var watchdogRestarts: Int?
    /// Times the slot was marked `stalled` (receive queue full, drops growing). Optional, as above.
    public var stalls: Int?
    /// The current worker sent `READY=1` to its NOTIFY_SOCKET (recorded only: readiness is still
    /// `ready_after_ms`). Optional, as above.
    public var notifiedReady: Bool?
    /// The last `STATUS=` the current worker sent, if any.
    public var notifiedStatus: String?
    /// The generation whose worker definition the slot runs. Optional, as above.
    public var generation: Int?
    /// When the current worker became ready (CLOCK_REALTIME, ns since the epoch).
    public var readySinceNs: UInt64?
    /// The slot's active health checks (`[service.health_check]`); nil without them.
    public var health: SlotHealthStatus?

    public init(slot: UInt32, pid: Int32?, state: String, restarts: Int, buckets: Int,
                droppedOutputLines: Int? = nil, droppedOutputBytes: Int? = nil, watchdogRestarts: Int? = nil,
                stalls: Int? = nil, notifiedReady: Bool? = nil, notifiedStatus: String? = nil, generation: Int? = nil,
                readySinceNs: UInt64? = nil) {
        self.generation = generation
        self.readySinceNs = readySinceNs
        self.slot = slot
        self.pid = pid
        self.state = state
        self.restarts = restarts
        self.buckets = buckets
        self.droppedOutputLines = droppedOutputLines
        self.droppedOutputBytes = droppedOutputBytes
        self.watchdogRestarts = watchdogRestarts
        self.stalls = stalls
        self.notifiedReady = notifiedReady
        self.notifiedStatus = notifiedStatus
    }
}

/// One slot's active health checks, counted since the daemon started.
public struct SlotHealthStatus: Codable, Sendable, Equatable {
    /// No failed probe since the last passed one, and no restart for health without a passed
    /// probe after it.
    public var healthy: Bool
    /// Probes judged: passed + failed + unreached.
    public var probes: Int
    public var passed: Int
    public var failed: Int
    /// Probes the slot's counter (rp_slot_stats) did not see: they say nothing of the worker.
    public var unreached: Int
    /// Probes not sent: no source port landed on the slot.
    public var unaddressable: Int
    public var consecutiveFailures: Int
    /// Workers restarted for failing `failures` probes in a row.
    public var restarts: Int
    /// Times the slot failed over for staying unhealthy through restarts.
    public var failovers: Int
    public var lastProblem: String?

    public init(healthy: Bool, probes: Int, passed: Int, failed: Int, unreached: Int, unaddressable: Int,
                consecutiveFailures: Int, restarts: Int, failovers: Int, lastProblem: String?) {
        self.healthy = healthy
        self.probes = probes
        self.passed = passed
        self.failed = failed
        self.unreached = unreached
        self.unaddressable = unaddressable
        self.consecutiveFailures = consecutiveFailures
        self.restarts = restarts
        self.failovers = failovers
        self.lastProblem = lastProblem
    }
}

/// An upgrade: a new generation of a service's workers, from its start to its switch, or to
/// its end without one. Times are CLOCK_REALTIME, ns since the epoch.
/// One generation's traffic during a canary's bake.
public struct BakeTraffic: Codable, Sendable, Equatable {
    public var generation: Int
    public var packets: UInt64
    public var drops: UInt64

    public init(generation: Int, packets: UInt64, drops: UInt64) {
        self.generation = generation
        self.packets = packets
        self.drops = drops
    }
}

public struct UpgradeStatus: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        /// The new workers start; no flow reaches them.
        case starting
        /// Every new worker is ready; every bucket learns the live flows of the old generation.
        case learning
        /// The buckets point at the new generation; the old one drains.
        case switched
        /// Given up before the switch (`reason`): the new workers were stopped, the old serve on.
        case abandoned
        /// A canary: the new generation takes the new flows of `canaryBuckets` buckets while it
        /// bakes; the working generation keeps the rest and every live flow.
        case canary
        /// The canary was rolled back (`reason`): its buckets are the working generation's again,
        /// its live flows stay on it until idle (at most `drain_timeout_ms`).
        case rolledBack = "rolled-back"
    }

    public var generation: Int
    /// The generation that was working when the upgrade started.
    public var previous: Int
    public var phase: Phase
    public var slots: [UInt32]
    /// Why it was abandoned.
    public var reason: String?
    public var startedNs: UInt64
    /// When the last of the new workers became ready.
    public var readyNs: UInt64?
    /// When learning began (every worker ready): nothing moved before.
    public var learningNs: UInt64?
    /// When the buckets switched.
    public var switchedNs: UInt64?
    /// A roll back to a generation still draining.
    public var rollback: Bool?
    /// A canary's share: the percent asked, the buckets it takes (of the table), how long it
    /// bakes, and when the bake ends (once its buckets switched; nil before).
    public var canaryPercent: Int?
    public var canaryBuckets: Int?
    public var bakeMs: Int?
    public var bakeEndsNs: UInt64?
    /// What the bake compared, per generation, at the last check: one line.
    public var comparison: String?
    /// Per generation, packets steered to its slots and datagrams the kernel dropped at their
    /// UDP sockets since the bake began, at the last check (the canary first). Nil before.
    public var bakeTraffic: [BakeTraffic]?

    public init(generation: Int, previous: Int, phase: Phase, slots: [UInt32], reason: String? = nil,
                startedNs: UInt64, readyNs: UInt64? = nil, learningNs: UInt64? = nil, switchedNs: UInt64? = nil,
                rollback: Bool? = nil) {
        self.generation = generation
        self.previous = previous
        self.phase = phase
        self.slots = slots
        self.reason = reason
        self.startedNs = startedNs
        self.readyNs = readyNs
        self.learningNs = learningNs
        self.switchedNs = switchedNs
        self.rollback = rollback
    }
}

public struct UpgradeCounts: Codable, Sendable, Equatable {
    public var started: Int
    public var switched: Int
    public var abandoned: Int

    public init(started: Int, switched: Int, abandoned: Int) {
        self.started = started
        self.switched = switched
        self.abandoned = abandoned
    }
}

/// Datagrams the daemon's notify socket ignored, by why.
public struct IgnoredNotifications: Codable, Sendable, Equatable {
    /// Not `KEY=VALUE` lines of UTF-8 (or empty).
    public var malformed = 0
    /// Longer than 4096 bytes.
    public var oversized = 0
    /// From a process that is not a worker (nor in a worker's process group or cgroup).
    public var notWorker = 0

    public init(malformed: Int = 0, oversized: Int = 0, notWorker: Int = 0) {
        self.malformed = malformed
        self.oversized = oversized
        self.notWorker = notWorker
    }
}

/// A slot whose new worker could not start, and why (the error of the call that failed).
public struct SlotStartFailure: Codable, Sendable, Equatable {
    public var slot: UInt32
    public var error: String

    public init(slot: UInt32, error: String) {
        self.slot = slot
        self.error = error
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

/// Why a request line was refused, as a sentence for the client.
public struct ControlRequestError: Error, CustomStringConvertible, Equatable {
    public var description: String

    public init(description: String) { self.description = description }
}

extension ControlFraming {
    /// Decodes one request line. Errors name the field that is wrong and what it takes,
    /// never a decoder's internals.
    public static func decodeRequest(_ line: Data) throws(ControlRequestError) -> ControlRequest {
        let example = #"a request is one JSON object per line, e.g. {"command":"status"}"#
        guard let object = try? JSONSerialization.jsonObject(with: line) else {
            throw ControlRequestError(description: "bad request: not JSON; \(example)")
        }
        guard let fields = object as? [String: Any] else {
            throw ControlRequestError(description: "bad request: not a JSON object; \(example)")
        }
        let commands = ControlRequest.Command.allCases.map(\.rawValue).joined(separator: ", ")
        if let command = fields["command"] as? String, ControlRequest.Command(rawValue: command) == nil {
            throw ControlRequestError(description: "bad request: unknown command '\(command)' (one of \(commands))")
        }
        // The decoder reports an out-of-range number without the field's name: check here.
        for (field, takes, limit) in numericFields where fields[field] != nil && !(fields[field] is NSNull) {
            guard let number = fields[field] as? NSNumber, number.doubleValue >= 0, number.doubleValue <= limit,
                  number.doubleValue == number.doubleValue.rounded()
            else {
                throw ControlRequestError(description: "bad request: field '\(field)' must be \(takes)")
            }
        }
        do {
            return try JSONDecoder().decode(ControlRequest.self, from: line)
        } catch let DecodingError.keyNotFound(key, _) {
            throw ControlRequestError(description: "bad request: missing field '\(key.stringValue)'")
        } catch {
            let field = fieldName(of: error) ?? "?"
            let takes = field == "command" ? "one of \(commands)"
                : numericFields.first { $0.name == field }?.takes ?? "a string"
            throw ControlRequestError(description: "bad request: field '\(field)' must be \(takes)")
        }
    }

    private static let numericFields: [(name: String, takes: String, limit: Double)] = [
        ("slot", "a slot number from 0 to \(UInt32.max)", Double(UInt32.max)),
        ("workers", "a whole number of workers, 0 or more", Double(Int32.max)),
    ]

    private static func fieldName(of error: Error) -> String? {
        switch error as? DecodingError {
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .dataCorrupted(let context):
            return context.codingPath.last?.stringValue
        default:
            return nil
        }
    }
}
