#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ReuseportControl
import ReuseportKit

struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Start a new generation of a service's workers; switch to it once every one is ready.",
        discussion: """
            The new workers start on new slots, beside the running ones, with the service's \
            worker definition (exec, builtin, user, group, environment: a program replaced at the \
            same path is picked up). No flow reaches them until every one is ready (READY=1 with \
            notify = true, else ready_after_ms). Then every bucket learns the live flows of the \
            old generation for one flow_idle_timeout_ms and switches: new flows go to the new \
            generation, each live flow keeps its old worker until it is idle, and the old workers \
            are stopped once drained (drain_signal first, if set). A new worker that exits, or \
            does not become ready within ready_timeout_ms, abandons the upgrade: the old \
            generation serves on. --rollback makes the generation still draining the working one \
            again. Then waits (see --no-wait) until the upgrade switched or was abandoned.

            So an upgrade takes at least one flow_idle_timeout_ms (60 s by default) with flow \
            tracking, after the new workers are ready. Without --timeout the wait is \
            ready_timeout_ms + flow_idle_timeout_ms + 30 s, the settings read from the daemon \
            (2 min at the defaults; without flow tracking, ready_timeout_ms + 30 s).

            A reload whose worker definition changed starts an upgrade the same way.

            --canary PERCENT makes it a canary (docs/operations.md, "A canary deployment"): once \
            every new worker is ready, PERCENT of the buckets (exactly, in the bucket table) send \
            their new flows to it, after learning their live flows, which stay. For --bake \
            DURATION the daemon compares the two generations (quick exits, crashes, watchdog \
            misses, stalls, health-check failures, per worker); a canary worse in any is rolled \
            back at once, naming why. At the end of the bake the service's canary_gate, if set, \
            decides by its exit status; then the canary is promoted: the other buckets learn and \
            switch, moving no live flow. --promote and --rollback end a bake at any time. The wait \
            follows the canary to its end.

            Examples:
              reuseportctl upgrade
              reuseportctl upgrade --service dns --no-wait
              reuseportctl upgrade --rollback
              reuseportctl upgrade --canary 10 --bake 10m
              reuseportctl upgrade --promote
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Flag(name: .customLong("no-wait"), help: "Return when the daemon has accepted, without waiting for the result.")
    var noWait = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon and for the switch (default: ready_timeout_ms + "
                               + "flow_idle_timeout_ms + 30 s, from the daemon).", valueName: "SECONDS"))
    var timeout: Double?

    @Flag(help: ArgumentHelp("Make the generation still draining the working one again (its slots take new flows); "
                             + "during a canary's bake, roll the canary back."))
    var rollback = false

    @Option(help: ArgumentHelp("Start the new generation as a canary taking the new flows of PERCENT of the buckets "
                               + "(1-99).", valueName: "PERCENT"))
    var canary: Int?

    @Option(help: ArgumentHelp("How long the canary bakes: 90s, 10m, 1h or milliseconds as 500ms (default: "
                               + "canary_bake_ms).", valueName: "DURATION"))
    var bake: String?

    @Flag(help: "Promote the canary that bakes now.")
    var promote = false

    func validate() throws {
        try ChangeWait.validate(timeout)
        if let canary, !(1...99).contains(canary) {
            throw ValidationError("--canary: give 1 to 99 percent of the buckets, not \(canary)")
        }
        if let bake, Self.milliseconds(bake) == nil {
            throw ValidationError("--bake: '\(bake)' is not a duration: give e.g. 90s, 10m, 1h or 500ms")
        }
        if [rollback, promote, canary != nil || bake != nil].filter({ $0 }).count > 1 {
            throw ValidationError("give one of --rollback, --promote, or --canary/--bake")
        }
    }

    /// "90s", "10m", "1h", "500ms", or a bare number of seconds, as milliseconds.
    static func milliseconds(_ text: String) -> Int? {
        let units: [(String, Double)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            guard let value = Double(text.dropLast(suffix.count)), value >= 0 else { return nil }
            return Int(value * factor)
        }
        return Double(text).flatMap { $0 >= 0 ? Int($0 * 1000) : nil }
    }

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: ChangeWait.answerSeconds(timeout))
        let target = try location.actionServiceStatus(service.service, client: client)
        let name = target.name
        let request = promote || canary != nil || bake != nil
            ? ControlRequest.canary(service: name, percent: canary, bakeMs: bake.flatMap(Self.milliseconds), promote: promote)
            : ControlRequest(command: .upgrade, service: name, rollback: rollback)
        let response = try client.perform(request)
        print(response.message ?? "upgrade of \(name) accepted")
        guard !noWait, let started = response.services?.first?.upgrade else { return }
        var wait = ChangeWait.upgrade(timeout: timeout, settings: response.services?.first?.settings ?? target.settings)
        if timeout == nil, let bakeMs = started.bakeMs, started.phase != UpgradeStatus.Phase.rolledBack {
            // A canary: its bake, and the promotion's learning, on top.
            let idle = Double((response.services?.first?.settings ?? target.settings)?.flowIdleTimeoutMs ?? 60_000)
            wait.seconds += (Double(bakeMs) + idle) / 1000
        }
        wait.announce("the switch")
        let deadline = MonotonicClock.seconds() + wait.seconds
        var last = started
        while MonotonicClock.seconds() < deadline {
            let status = try client.perform(ControlRequest(command: .status, service: name))
            guard let upgrade = status.services?.first?.upgrade, upgrade.generation == started.generation else {
                throw CtlError.timeout("\(name): the upgrade to generation \(started.generation) was replaced")
            }
            if upgrade.phase != last.phase || upgrade.bakeEndsNs != last.bakeEndsNs {
                print("\(name): \(MapDumpCommand.upgradeSummary(upgrade))")
            }
            last = upgrade
            switch upgrade.phase {
            case .switched:
                print("\(name): generation \(upgrade.generation) works; generation \(upgrade.previous) drains")
                return
            case .abandoned:
                throw CtlError.upgradeAbandoned(service: name, generation: upgrade.generation,
                                                reason: upgrade.reason ?? "no reason given")
            case .rolledBack:
                if promote || canary != nil || bake != nil || !rollback {
                    throw CtlError.canaryRolledBack(service: name, generation: upgrade.generation,
                                                    reason: upgrade.reason ?? "no reason given")
                }
                print("\(name): generation \(upgrade.generation)'s canary rolled back: \(upgrade.reason ?? "")")
                return
            case .starting, .learning, .canary:
                usleep(100_000)
            }
        }
        throw CtlError.timeout("\(name): generation \(started.generation) is still \(last.phase.rawValue) after "
            + "\(Int(wait.seconds)) s (see map dump)")
    }
}
