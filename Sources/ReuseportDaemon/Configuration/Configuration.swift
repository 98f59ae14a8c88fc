import ReuseportKit

/// The daemon's configuration: what `--config FILE` describes (docs/configuration.md).
/// Codable: a reload gets it, checked, from a short-lived child (ConfigurationCheck.swift).
public struct DaemonConfiguration: Sendable, Equatable, Codable {
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    public var stopTimeoutMs: Int
    public var services: [ServiceConfiguration]

    public static let defaultStopTimeoutMs = 5000

    public init(stopTimeoutMs: Int = DaemonConfiguration.defaultStopTimeoutMs, services: [ServiceConfiguration]) {
        self.stopTimeoutMs = stopTimeoutMs
        self.services = services
    }

    /// The embedded configuration used without `--config`: a demo to try at once.
    public static let embeddedText = """
        # reuseportd's built-in demo: 4 whoami workers on udp://127.0.0.1:5300.
        [[service]]
        name = "demo"
        listen = ["udp://127.0.0.1:5300"]
        workers = 4
        builtin = "whoami"
        """

    /// Where the embedded configuration says it comes from in messages.
    public static let embeddedName = "<built-in demo configuration>"
}

/// The program a service's workers run.
public enum WorkerProgram: Sendable, Equatable, Codable {
    /// `exec = ["/path", "arg", ...]`
    case exec([String])
    /// `builtin = "echo" | "whoami"`
    case builtin(BuiltinWorkerKind)
}

public enum BuiltinWorkerKind: String, Sendable, CaseIterable, Codable {
    case echo, whoami
}

/// One `[[service]]` table.
public struct ServiceConfiguration: Sendable, Equatable, Codable {
    public var name: String
    public var listen: [Endpoint]
    public var workers: Int
    public var program: WorkerProgram
    /// Run workers as this user (name or numeric id); nil keeps the daemon's.
    public var user: String?
    /// Run workers with this group (name or numeric id); nil: the user's primary group.
    public var group: String?
    /// `environment = ["KEY=value", ...]`: added to every worker's environment (WorkerEnvironment.swift).
    public var environment: [String]
    /// SO_RCVBUF of every socket, in bytes; nil keeps the kernel default.
    public var receiveBuffer: Int?
    public var bucketCount: Int
    public var seed: UInt32
    public var restart: RestartPolicy
    /// A slot down this long has its buckets pointed at live slots until it is healthy again.
    public var failoverAfterMs: Int
    /// A worker that sends no `WATCHDOG=1` to its NOTIFY_SOCKET for this long is stopped
    /// (SIGABRT, SIGKILL at the stop timeout) and restarted, as systemd's `WatchdogSec=`; 0: off.
    public var watchdogMs: Int = 0
    /// How placement changes keep live UDP flows on their worker (flow records, drains).
    public var tracking = ServiceDataPlane.FlowTracking()
    /// `[service.quic]`: steer UDP by QUIC connection ID (docs/quic.md); nil: off.
    public var quic: QuicSteering?
    /// `[service.health_check]`: probes each worker through the shared port; nil: off.
    public var healthCheck: HealthCheckSettings?
    /// `canary_percent` and its keys: every upgrade starts as a canary; nil: upgrades switch whole.
    public var canary: CanarySettings?
    /// `notify = true`: a worker is ready when it sends `READY=1` to its NOTIFY_SOCKET, not after
    /// `ready_after_ms`; an upgrade switches only once every new worker is ready.
    public var notify = false
    /// An upgrade whose new workers are not all ready within this is abandoned.
    public var readyTimeoutMs = ServiceConfiguration.defaultReadyTimeoutMs
    /// Sent to the old generation's workers when an upgrade switches (nil: none); they are
    /// stopped with SIGTERM once their recorded flows are idle, as in a scale-down.
    public var drainSignal: Int32?
    /// `preload_bind = true`: the workers get the bind preload library (LD_PRELOAD), which turns
    /// the program's own bind() of a listener's address into the slot's socket (BindPreload.swift).
    public var preloadBind = false

    public static let defaultReadyTimeoutMs = 30_000

    /// What a generation's workers run: a change here is an upgrade (new slots, new workers),
    /// a change elsewhere applies to the running workers.
    public var workerDefinition: WorkerDefinition {
        get {
            WorkerDefinition(program: program, user: user, group: group, environment: environment, notify: notify,
                             preloadBind: preloadBind)
        }
        set {
            program = newValue.program
            user = newValue.user
            group = newValue.group
            environment = newValue.environment
            notify = newValue.notify
            preloadBind = newValue.preloadBind
        }
    }

    public static let defaultFailoverAfterMs = 5000

    public init(name: String, listen: [Endpoint], workers: Int, program: WorkerProgram, user: String? = nil,
                group: String? = nil, receiveBuffer: Int? = nil, bucketCount: Int = Int(RP_DEFAULT_BUCKETS),
                seed: UInt32 = 0, restart: RestartPolicy = RestartPolicy(),
                failoverAfterMs: Int = ServiceConfiguration.defaultFailoverAfterMs, environment: [String] = []) {
        self.name = name
        self.environment = environment
        self.listen = listen
        self.workers = workers
        self.program = program
        self.user = user
        self.group = group
        self.receiveBuffer = receiveBuffer
        self.bucketCount = bucketCount
        self.seed = seed
        self.restart = restart
        self.failoverAfterMs = failoverAfterMs
    }

    /// What the sockets and the program depend on: a change here needs new sockets
    /// (the service is rebuilt), a change elsewhere does not.
    var dataPlaneShape: [String] {
        listen.map(\.description) + ["\(receiveBuffer ?? -1)", "\(bucketCount)", "\(seed)",
                                      tracking.maxFlows.map { "\($0)" } ?? "sized from the workers",
                                      "\(String(describing: quic))"]
    }
}

/// The program a generation's workers run, as whom and with what environment, and how they
/// say they are ready.
public struct WorkerDefinition: Sendable, Equatable, Codable {
    public var program: WorkerProgram
    public var user: String?
    public var group: String?
    public var environment: [String]
    public var notify: Bool
    public var preloadBind: Bool
}

/// When a slot's worker is started again after it exits.
///
/// The first restart after a healthy run is immediate (a worker killed once loses no
/// time); each further exit within `healthyAfterMs` of its start doubles the wait, from
/// `backoffMinimumMs` up to `backoffMaximumMs`. A worker killed by a signal after it was
/// ready (alive `readyAfterMs`) did start: its death is not a quick exit, it is restarted at
/// once and the count starts over. The back-off is for a program that cannot start, not for
/// one that something outside kills.
public struct RestartPolicy: Sendable, Equatable, Codable {
    public var backoffMinimumMs: Int
    public var backoffMaximumMs: Int
    /// A worker that lived this long resets the back-off.
    public var healthyAfterMs: Int
    /// A worker alive this long counts as running (and a failed-over slot gets its buckets back).
    public var readyAfterMs: Int

    public init(backoffMinimumMs: Int = 100, backoffMaximumMs: Int = 10_000, healthyAfterMs: Int = 10_000,
                readyAfterMs: Int = 500) {
        self.backoffMinimumMs = backoffMinimumMs
        self.backoffMaximumMs = backoffMaximumMs
        self.healthyAfterMs = healthyAfterMs
        self.readyAfterMs = readyAfterMs
    }

    /// After a worker that lived `livedMs` exited, with `quickExits` quick exits before it: the
    /// wait before the next start, and the new count of quick exits in a row.
    /// `killedBySignal`: the worker did not exit by itself (SIGKILL from outside, the OOM killer,
    /// a crash).
    public func afterExit(livedMs: Int, quickExits: Int, killedBySignal: Bool = false)
        -> (delayMs: Int, quickExits: Int)
    {
        if killedBySignal && livedMs >= readyAfterMs { return (0, 0) }
        let before = livedMs >= healthyAfterMs ? 0 : quickExits
        return (delayMs(afterQuickExits: before), before + 1)
    }

    /// `delayMs` plus up to a quarter more, at random: slots that went down together (a kill
    /// storm, a dependency that came back) do not all restart, and die, in step. Only ever
    /// longer, so a back-off is never shorter than documented.
    public static func jittered(_ delayMs: Int, using random: inout some RandomNumberGenerator) -> Int {
        delayMs <= 0 ? delayMs : delayMs + Int.random(in: 0...(delayMs / 4), using: &random)
    }

    /// The wait before the next start, after `failures` quick exits in a row (0: none yet).
    public func delayMs(afterQuickExits failures: Int) -> Int {
        guard failures > 0 else { return 0 }
        let doublings = min(failures - 1, 30)
        return min(backoffMaximumMs, backoffMinimumMs << doublings)
    }
}
