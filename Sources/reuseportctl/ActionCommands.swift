#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ReuseportControl
import ReuseportKit

/// What the actions share: the daemon to ask, the service, and waiting for the pins to show
/// the result (the daemon answers when it has acted; the worker may take a moment to be up).
struct ActionOptions: ParsableArguments {
    @Flag(name: .customLong("no-wait"), help: "Return when the daemon has accepted, without waiting for the result.")
    var noWait = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon and for the result.", valueName: "SECONDS"))
    var timeout: Double = 30

    func validate() throws {
        guard timeout.isFinite, timeout > 0, timeout <= 3600 else {
            throw ValidationError("--timeout \(timeout) is outside (0, 3600] seconds")
        }
    }
}

/// `--no-wait` and `--timeout` of `scale` and `upgrade`, whose changes take at least one
/// flow_idle_timeout_ms (with flow tracking they learn the live flows that long before they
/// switch): without --timeout, the wait follows from the service's settings, which the daemon's
/// status gives. Each command declares its own `--timeout`, whose help says how.
struct ChangeWait {
    /// Beyond what the settings say a change takes: for the daemon's answer, workers to start.
    static let marginSeconds = 30
    /// As ActionOptions' `--timeout`, which has a fixed default.
    static func validate(_ timeout: Double?) throws {
        guard let timeout else { return }
        guard timeout.isFinite, timeout > 0, timeout <= 3600 else {
            throw ValidationError("--timeout \(timeout) is outside (0, 3600] seconds")
        }
    }

    /// How long to wait, and why (for the line that announces the wait).
    var seconds: Double
    var reason: String

    /// The daemon's answer is awaited for --timeout, or for the margin.
    static func answerSeconds(_ timeout: Double?) -> Double { timeout ?? Double(marginSeconds) }

    /// An older daemon does not say its settings: the configuration's defaults (docs/configuration.md).
    static let defaultSettings = ServiceSettings(flowTracking: true, flowIdleTimeoutMs: 60_000, readyTimeoutMs: 30_000)

    /// ready_timeout_ms + flow_idle_timeout_ms (with flow tracking) + the margin.
    static func upgrade(timeout: Double?, settings: ServiceSettings?) -> ChangeWait {
        waiting(timeout, settings, ready: true, learn: true)
    }

    /// flow_idle_timeout_ms (with flow tracking, not --now) + the margin.
    static func scale(timeout: Double?, settings: ServiceSettings?, now: Bool) -> ChangeWait {
        waiting(timeout, settings, ready: false, learn: !now)
    }

    private static func waiting(_ timeout: Double?, _ given: ServiceSettings?, ready: Bool, learn: Bool) -> ChangeWait {
        if let timeout { return ChangeWait(seconds: timeout, reason: "--timeout") }
        let settings = given ?? defaultSettings
        var parts: [String] = []
        var ms = marginSeconds * 1000
        if ready {
            parts.append("ready_timeout_ms \(milliseconds(settings.readyTimeoutMs))")
            ms += settings.readyTimeoutMs
        }
        if learn && settings.flowTracking {
            parts.append("flow_idle_timeout_ms \(milliseconds(settings.flowIdleTimeoutMs))")
            ms += settings.flowIdleTimeoutMs
        }
        parts.append("\(marginSeconds) s")
        var reason = parts.joined(separator: " + ")
        if given == nil { reason += ", the defaults: this daemon does not say its settings" }
        return ChangeWait(seconds: (Double(ms) / 1000).rounded(.up), reason: reason)
    }

    static func milliseconds(_ ms: Int) -> String {
        ms % 1000 == 0 ? "\(ms / 1000) s" : "\(HumanFormat.fixed(Double(ms) / 1000, digits: 1)) s"
    }

    /// "waiting up to 63 s for the switch (ready_timeout_ms 30 s + flow_idle_timeout_ms 3 s + 30 s)"
    func announce(_ what: String) {
        print("waiting up to \(Int(seconds.rounded(.up))) s for \(what) (\(reason))")
    }
}

extension LocationOptions {
    /// The service an action is for: the one named, or the daemon's only one.
    func actionService(_ named: String?, client: ControlClient) throws -> String {
        try actionServiceStatus(named, client: client).name
    }

    /// The daemon's status of the service an action is for: the one named, or its only one.
    func actionServiceStatus(_ named: String?, client: ControlClient) throws -> ServiceStatus {
        let status = try client.perform(ControlRequest(command: .status))
        let services = status.services ?? []
        let names = services.map(\.name)
        if let named {
            guard let service = services.first(where: { $0.name == named }) else {
                throw CtlError.noSuchDaemonService(named, socket: controlSocket, existing: names)
            }
            return service
        }
        guard services.count == 1 else {
            throw CtlError.daemonServiceNeeded(existing: names, socket: controlSocket)
        }
        return services[0]
    }

    /// Polls the pinned maps of `service` until `done` holds or `timeout` passes; the last
    /// snapshot read and whether `done` held. Nil if the pins cannot be read (other --pin-dir).
    func waitForPins(_ service: String, timeout: Double, until done: (ServiceSnapshot) -> Bool)
        -> (snapshot: ServiceSnapshot, done: Bool)?
    {
        let reader = ServiceReader(root: pinDirectory)
        let deadline = MonotonicClock.seconds() + timeout
        while true {
            guard let snapshot = try? reader.read([service], sockets: false).first else { return nil }
            if done(snapshot) { return (snapshot, true) }
            if MonotonicClock.seconds() >= deadline { return (snapshot, false) }
            usleep(50_000)
        }
    }

    func pinnedSnapshot(_ service: String) -> ServiceSnapshot? {
        try? ServiceReader(root: pinDirectory).read([service], sockets: false).first
    }
}

struct RestartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restart",
        abstract: "Restart the worker of one slot (its socket, and so its flows, stay).",
        discussion: """
            Asks the daemon to stop the slot's worker and start a new one on the same socket. \
            Datagrams that arrive meanwhile wait in the socket for the new worker. Then waits \
            (see --no-wait) until the pinned state shows a new worker running.

            Examples:
              reuseportctl restart 2
              reuseportctl restart 0 --service dns --no-wait
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption
    @OptionGroup var action: ActionOptions

    @Argument(help: ArgumentHelp("The slot whose worker to restart.", valueName: "SLOT"))
    var slot: UInt32

    func validate() throws {
        guard Slot.range.contains(Int(slot)) else {
            throw ValidationError("SLOT \(slot) is beyond the last possible slot, \(Slot.range.upperBound)")
        }
    }

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: action.timeout)
        let status = try location.actionServiceStatus(service.service, client: client)
        let name = status.name
        // A slot the service does not have is a bad argument (status 2), as a slot beyond any
        // service's is in validate(); only the daemon knows which slots a service has.
        let slots = status.slots.map(\.slot)
        guard slots.contains(slot) else {
            throw CtlError.badArgument("SLOT \(slot): service \(name) has no such slot; "
                + (slots.min().map { "its slots are \($0) to \(slots.max() ?? $0)" } ?? "it has none"),
                command: Self.self)
        }
        let before = location.pinnedSnapshot(name)?.slots.first { $0.index == slot }
        let response = try client.perform(ControlRequest(command: .restart, service: name, slot: slot))
        print(response.message ?? "restart of slot \(slot) of \(name) accepted")
        guard !action.noWait else { return }
        let oldPid = before?.pid
        let oldRestarts = before?.state.restarts
        let result = location.waitForPins(name, timeout: action.timeout) { snapshot in
            guard let now = snapshot.slots.first(where: { $0.index == slot }) else { return false }
            let renewed = (oldPid != nil && now.pid != oldPid) || (oldRestarts != nil && now.state.restarts != oldRestarts)
            return now.workerState == .running && now.pid != nil && renewed
        }
        guard let result else { return }
        let now = result.snapshot.slots.first { $0.index == slot }
        let pid = HumanFormat.optional(now?.pid)
        guard result.done else {
            throw CtlError.timeout("slot \(slot) of \(name) has no new running worker after \(Int(action.timeout)) s:"
                                   + " state \(now.map { "\($0.workerState)" } ?? "unknown"), pid \(pid)")
        }
        print("slot \(slot) of \(name): worker \(HumanFormat.optional(oldPid)) -> \(pid), running")
    }
}

struct ScaleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale",
        abstract: "Change the number of workers (slots) of a service, moving the fewest buckets.",
        discussion: """
            Growing from N to M slots moves only the buckets the new slots need (1 - N/M of them); \
            shrinking moves only the buckets of the removed slots. With flow tracking (the default \
            for UDP) no live flow moves: the moving buckets first record the flows they see for one \
            flow_idle_timeout_ms, then switch, and each recorded flow keeps its worker until it is \
            idle. Slots that leave take no new flow from the switch on, and their workers are stopped once their \
            recorded flows are idle (or at drain_timeout_ms). --now switches at once instead, and \
            says first how many flows that moves. Then waits (see --no-wait) until the pinned \
            state shows N workers of the working generation running and the buckets switched.

            So a scale takes at least one flow_idle_timeout_ms (60 s by default) with flow tracking. \
            Without --timeout the wait is flow_idle_timeout_ms + 30 s, the setting read from the \
            daemon (90 s at the defaults; 30 s with --now or without flow tracking).

            Examples:
              reuseportctl scale 8
              reuseportctl scale 2 --service dns
              reuseportctl scale 2 --dry-run
              reuseportctl scale 2 --now
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Flag(name: .customLong("no-wait"), help: "Return when the daemon has accepted, without waiting for the result.")
    var noWait = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon and for the switch (default: flow_idle_timeout_ms + "
                               + "30 s, from the daemon; 30 s with --now or without flow tracking).",
                               valueName: "SECONDS"))
    var timeout: Double?

    @Argument(help: ArgumentHelp("The number of workers.", valueName: "N"))
    var workers: Int

    @Flag(help: "Switch at once: no learning, leaving slots retire now (their live flows move).")
    var now = false

    @Flag(help: "Say what the change would move; change nothing.")
    var dryRun = false

    func validate() throws {
        guard SlotCount.range.contains(workers) else {
            throw ValidationError("N \(workers) is outside \(SlotCount.range) workers")
        }
        try ChangeWait.validate(timeout)
    }

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: ChangeWait.answerSeconds(timeout))
        let target = try location.actionServiceStatus(service.service, client: client)
        let name = target.name
        let before = location.pinnedSnapshot(name)
        if dryRun || now {
            // Said before anything changes: what switching at once moves.
            let plan = try client.perform(ControlRequest(command: .scale, service: name, workers: workers, now: now,
                                                         dryRun: true))
            print(plan.message ?? "")
            if dryRun { return }
        }
        let response = try client.perform(ControlRequest(command: .scale, service: name, workers: workers, now: now))
        print(response.message ?? "scale of \(name) to \(workers) accepted")
        guard !noWait else { return }
        let wait = ChangeWait.scale(timeout: timeout, settings: target.settings, now: now)
        wait.announce("\(workers) running workers and the switch")
        // The working generation's slots (after an upgrade they need not start at 0), and the
        // buckets switched: the change is done, and the next one (a scale, an upgrade) is taken.
        let result = location.waitForPins(name, timeout: wait.seconds) { snapshot in
            snapshot.transition.phase != RP_TRANSITION_LEARNING.rawValue && snapshot.slots.filter {
                $0.state.generation == snapshot.transition.working_generation && $0.workerState == .running
                    && $0.pid != nil
            }.count >= workers
        }
        guard let result else { return }
        guard result.done else {
            let running = result.snapshot.slots.filter { $0.workerState == .running }.count
            let learning = result.snapshot.transition.phase == RP_TRANSITION_LEARNING.rawValue
            throw CtlError.timeout("\(name) does not show \(workers) running workers and the switch after "
                                   + "\(Int(wait.seconds)) s: slot_count \(result.snapshot.config.slot_count), "
                                   + "\(running) running\(learning ? ", still learning its live flows" : "")"
                                   + " (see map dump)")
        }
        var summary = "\(name): \(workers) workers running"
        if let before, before.buckets.count == result.snapshot.buckets.count, !before.buckets.isEmpty {
            let moved = zip(before.buckets, result.snapshot.buckets).filter { $0 != $1 }.count
            summary += "; \(moved) of \(before.buckets.count) buckets moved"
                + " (\(HumanFormat.percent(UInt64(moved), of: UInt64(before.buckets.count))))"
        }
        print(summary)
    }
}

struct ReloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Make the daemon re-read its configuration file (as SIGHUP does).",
        discussion: """
            Examples:
              reuseportctl reload
              reuseportctl reload --run-dir /run/reuseportd-staging
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions

    @Option(help: ArgumentHelp("Seconds to wait for the daemon's answer.", valueName: "SECONDS"))
    var timeout: Double = 30

    func validate() throws {
        guard timeout.isFinite, timeout > 0, timeout <= 3600 else {
            throw ValidationError("--timeout \(timeout) is outside (0, 3600] seconds")
        }
    }

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: timeout)
        let response = try client.perform(ControlRequest(command: .reload))
        print(response.message ?? "reloaded")
    }
}
