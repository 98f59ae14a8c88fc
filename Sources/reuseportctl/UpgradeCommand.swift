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

            A reload whose worker definition changed starts an upgrade the same way.

            Examples:
              reuseportctl upgrade
              reuseportctl upgrade --service dns --no-wait
              reuseportctl upgrade --rollback
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption
    @OptionGroup var action: ActionOptions

    @Flag(help: "Make the generation still draining the working one again (its slots take new flows).")
    var rollback = false

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: action.timeout)
        let name = try location.actionService(service.service, client: client)
        let response = try client.perform(ControlRequest(command: .upgrade, service: name, rollback: rollback))
        print(response.message ?? "upgrade of \(name) accepted")
        guard !action.noWait, let started = response.services?.first?.upgrade else { return }
        let deadline = MonotonicClock.seconds() + action.timeout
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
            + "\(Int(action.timeout)) s (see map dump)")
    }
}
