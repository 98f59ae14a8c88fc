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

            Examples:
              reuseportctl upgrade
              reuseportctl upgrade --service dns --no-wait
              reuseportctl upgrade --rollback
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Flag(name: .customLong("no-wait"), help: "Return when the daemon has accepted, without waiting for the result.")
    var noWait = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon and for the switch (default: ready_timeout_ms + "
                               + "flow_idle_timeout_ms + 30 s, from the daemon).", valueName: "SECONDS"))
    var timeout: Double?

    @Flag(help: "Make the generation still draining the working one again (its slots take new flows).")
    var rollback = false

    func validate() throws {
        try ChangeWait.validate(timeout)
    }

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: ChangeWait.answerSeconds(timeout))
        let target = try location.actionServiceStatus(service.service, client: client)
        let name = target.name
        let response = try client.perform(ControlRequest(command: .upgrade, service: name, rollback: rollback))
        print(response.message ?? "upgrade of \(name) accepted")
        guard !noWait, let started = response.services?.first?.upgrade else { return }
        let wait = ChangeWait.upgrade(timeout: timeout, settings: response.services?.first?.settings ?? target.settings)
        wait.announce("the switch")
        let deadline = MonotonicClock.seconds() + wait.seconds
        var last = started
        while MonotonicClock.seconds() < deadline {
            let status = try client.perform(ControlRequest(command: .status, service: name))
            guard let upgrade = status.services?.first?.upgrade, upgrade.generation == started.generation else {
                throw CtlError.timeout("\(name): the upgrade to generation \(started.generation) was replaced")
            }
            last = upgrade
            switch upgrade.phase {
            case .switched:
                print("\(name): generation \(upgrade.generation) works; generation \(upgrade.previous) drains")
                return
            case .abandoned:
                throw CtlError.upgradeAbandoned(service: name, generation: upgrade.generation,
                                                reason: upgrade.reason ?? "no reason given")
            case .starting, .learning:
                usleep(100_000)
            }
        }
        throw CtlError.timeout("\(name): generation \(started.generation) is still \(last.phase.rawValue) after "
            + "\(Int(wait.seconds)) s (see map dump)")
    }
}
