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
            misses, stalls, health-check failures, per worker; kernel drops per packet at their \
            sockets); a canary worse in any is rolled back at once, naming why. At the end of the bake the service's canary_gate, if set, \
            decides by its exit status; then the canary is promoted: the other buckets learn and \
            switch, moving no live flow. --promote and --rollback end a bake at any time. The wait \
            follows the canary to its end. A reload that would change the service's workers \
            (definition, count, sockets) is refused while a canary learns or bakes.

            --watch starts nothing: it follows the upgrade or canary in progress (started by \
            another reuseportctl, or by a reload) and prints a line at each change: the phase, each \
            generation's share of the buckets, its workers' health, the packets steered to it \
            since the watch began and its live flows (recorded while a change runs), the bake's time left and comparison. It exits 0 once the upgrade \
            switched (a canary promoted), 1 once it was rolled back or abandoned; without \
            --timeout it waits as long as that takes. An upgrade already ended is reported, with \
            the same exit status.

            Examples:
              reuseportctl upgrade
              reuseportctl upgrade --service dns --no-wait
              reuseportctl upgrade --rollback
              reuseportctl upgrade --canary 10 --bake 10m
              reuseportctl upgrade --promote
              reuseportctl upgrade --watch --service dns
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

    @Flag(help: ArgumentHelp("Start nothing: follow the upgrade or canary in progress to its end, one line at each "
                             + "change (exit status 0 once it switched, 1 once rolled back or abandoned)."))
    var watch = false

    func validate() throws {
        try ChangeWait.validate(timeout)
        if let canary, !(1...99).contains(canary) {
            throw ValidationError("--canary: give 1 to 99 percent of the buckets, not \(canary)")
        }
        if let bake, Self.milliseconds(bake) == nil {
            throw ValidationError("--bake: '\(bake)' is not a duration: give e.g. 90s, 10m, 1h or 500ms")
        }
        if [rollback, promote, canary != nil || bake != nil, watch].filter({ $0 }).count > 1 {
            throw ValidationError("give one of --rollback, --promote, --watch, or --canary/--bake")
        }
        if watch, noWait { throw ValidationError("--watch waits: it takes no --no-wait") }
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
        if watch { return try follow(target, client: client) }
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
        var last = started
        try Self.poll(name, generation: started.generation, client: client, seconds: wait.seconds) { service, upgrade in
            if upgrade.phase != last.phase || upgrade.bakeEndsNs != last.bakeEndsNs {
                print("\(name): \(MapDumpCommand.upgradeSummary(upgrade))")
            }
            last = upgrade
            if upgrade.phase == .rolledBack, rollback, canary == nil, !promote {
                print("\(name): generation \(upgrade.generation)'s canary rolled back: \(upgrade.reason ?? "")")
                return true
            }
            return try Self.ended(name, upgrade)
        }
    }

    /// `--watch`: the upgrade in progress, or the last one, followed to its end.
    private func follow(_ target: ServiceStatus, client: ControlClient) throws {
        let name = target.name
        guard let first = target.upgrade else {
            throw CtlError.unanswerable("\(name) has had no upgrade since the daemon started: nothing to watch")
        }
        let baseline = WatchLine.read(name, pinDirectory: location.pinDirectory)?.packets
        var shown: WatchLine?
        try Self.poll(name, generation: first.generation, client: client, seconds: timeout, status: target) {
            service, upgrade in
            let pins = WatchLine.read(name, pinDirectory: location.pinDirectory)
            let line = WatchLine(service, upgrade, packets: pins?.packets, since: baseline, records: pins?.records)
            if line != shown { print("\(name): \(line.text())") }
            shown = line
            return try Self.ended(name, upgrade)
        }
    }

    /// Asks the status every 100 ms and hands the upgrade to `step` until it says the upgrade
    /// ended, or until `seconds` (forever without); the upgrade being replaced by another ends it.
    private static func poll(_ name: String, generation: Int, client: ControlClient, seconds: Double?,
                             status first: ServiceStatus? = nil,
                             _ step: (ServiceStatus, UpgradeStatus) throws -> Bool) throws {
        let deadline = seconds.map { MonotonicClock.seconds() + $0 }
        var phase = "starting"
        var next = first
        while deadline.map({ MonotonicClock.seconds() < $0 }) ?? true {
            let service = try next ?? client.perform(ControlRequest(command: .status, service: name)).services?.first
            next = nil
            guard let service, let upgrade = service.upgrade, upgrade.generation == generation else {
                throw CtlError.timeout("\(name): the upgrade to generation \(generation) was replaced")
            }
            phase = upgrade.phase.rawValue
            if try step(service, upgrade) { return }
            usleep(100_000)
        }
        throw CtlError.timeout("\(name): generation \(generation) is still \(phase) after "
            + "\(Int(seconds ?? 0)) s (see map dump)")
    }

    /// True once `upgrade` switched; throws once it was abandoned or rolled back.
    private static func ended(_ name: String, _ upgrade: UpgradeStatus) throws -> Bool {
        switch upgrade.phase {
        case .switched:
            print("\(name): generation \(upgrade.generation) works; generation \(upgrade.previous) drains")
            return true
        case .abandoned:
            throw CtlError.upgradeAbandoned(service: name, generation: upgrade.generation,
                                            reason: upgrade.reason ?? "no reason given")
        case .rolledBack:
            throw CtlError.canaryRolledBack(service: name, generation: upgrade.generation,
                                            reason: upgrade.reason ?? "no reason given")
        case .starting, .learning, .canary:
            return false
        }
    }
}

/// One line of `upgrade --watch`: shown again when anything but the packets, the flows and the
/// bake's time left changed.
struct WatchLine: Equatable {
    struct Generation: Equatable {
        var generation: Int
        var buckets = 0
        var workers = 0
        var healthy = 0
        var checked = false
    }

    var upgrade: UpgradeStatus
    var generations: [Generation]
    /// Packets steered to each generation since the watch began: not part of the comparison.
    var packets: [Int: UInt64]
    /// Live flows recorded for each generation's slots (the sum of their records, swept while a
    /// change runs; 0 when none runs): not part of the comparison either.
    var flows: [Int: UInt64]

    init(_ service: ServiceStatus, _ upgrade: UpgradeStatus, packets now: [UInt32: UInt64]?,
         since: [UInt32: UInt64]?, records: [UInt32: UInt64]? = nil) {
        var byGeneration: [Int: Generation] = [:]
        var packets: [Int: UInt64] = [:]
        var flows: [Int: UInt64] = [:]
        for slot in service.slots {
            let number = slot.generation ?? upgrade.previous
            var generation = byGeneration[number] ?? Generation(generation: number)
            generation.buckets += slot.buckets
            generation.workers += 1
            if let health = slot.health {
                generation.checked = true
                if health.healthy { generation.healthy += 1 }
            }
            byGeneration[number] = generation
            if let count = now?[slot.slot] { packets[number, default: 0] += count - min(since?[slot.slot] ?? 0, count) }
            if let count = records?[slot.slot] { flows[number, default: 0] += count }
        }
        self.upgrade = upgrade
        generations = byGeneration.values.sorted { $0.generation > $1.generation }
        self.packets = packets
        self.flows = flows
    }

    static func == (a: WatchLine, b: WatchLine) -> Bool {
        a.upgrade == b.upgrade && a.generations == b.generations
    }

    func text() -> String {
        let total = max(generations.reduce(0) { $0 + $1.buckets }, 1)
        let shares = generations.map { generation in
            var part = "generation \(generation.generation) \(generation.buckets) buckets ("
                + String(format: "%.1f", Double(generation.buckets) * 100 / Double(total)) + "%), "
                + "\(generation.workers) workers"
            if generation.checked { part += " (\(generation.healthy) healthy)" }
            return part + ", \(packets[generation.generation] ?? 0) packets, \(flows[generation.generation] ?? 0) flows"
        }
        return MapDumpCommand.upgradeSummary(upgrade) + " | " + shares.joined(separator: "; ")
    }

    /// Packets the program steered to each slot (rp_slot_stats) and the live flow records naming
    /// it (rp_slot_state), from the pins; nil when they cannot be read (then every generation
    /// shows 0).
    static func read(_ name: String, pinDirectory: String)
        -> (packets: [UInt32: UInt64], records: [UInt32: UInt64])? {
        guard let snapshot = try? ServiceReader(root: pinDirectory).read([name], sockets: false).first else { return nil }
        return (Dictionary(snapshot.slots.map { ($0.index, $0.counters.packets) }, uniquingKeysWith: +),
                Dictionary(snapshot.slots.map { ($0.index, UInt64($0.state.records)) }, uniquingKeysWith: +))
    }
}
