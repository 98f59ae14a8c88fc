#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ReuseportControl
import ReuseportKit

/// Actions on the daemon process itself.
struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daemon",
        abstract: "Act on the daemon process itself.",
        subcommands: [DaemonReexecCommand.self]
    )
}

struct DaemonReexecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reexec",
        abstract: "Upgrade the daemon in place: exec the reuseportd binary on disk in the same process.",
        discussion: """
            The daemon execs the reuseportd binary at the path it was started from (so install \
            the new one there first), with the same arguments, in its own process: the pid \
            stays (systemd's main PID too), the workers stay its children and keep serving, and \
            the new image adopts every worker, its sockets and the pinned maps, as a daemon \
            started after a crash does. No datagram is lost and no flow moves. SIGUSR2 to the \
            daemon does the same. It refuses while \
            workers are being stopped (their deadlines would be lost). Then waits (see --no-wait) \
            until the new image answers, and says which version it runs (and the one before) and \
            how many workers it adopted.

            A new binary that cannot start leaves the workers serving without a daemon; the \
            next reuseportd started on the same pins adopts them.

            Example:
              reuseportctl daemon reexec
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var action: ActionOptions

    func run() throws {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: action.timeout)
        let before = try client.perform(ControlRequest(command: .status))
        let response = try client.perform(ControlRequest(command: .reexec))
        print(response.message ?? "re-exec accepted")
        guard !action.noWait else { return }
        let deadline = MonotonicClock.seconds() + action.timeout
        while MonotonicClock.seconds() < deadline {
            usleep(100_000)
            guard let now = try? client.perform(ControlRequest(command: .status)), let daemon = now.daemon,
                  daemon.startedAtNs != before.daemon?.startedAtNs
            else { continue }
            let services = now.services ?? []
            let adopted = services.map { "\($0.name): \($0.adoptedWorkers ?? 0) of \($0.slots.count)" }
            // Which build ran before and runs now: a reexec after installing a new binary changes it.
            let unknown = "unknown (too old to say)"
            print("pid \(daemon.pid) runs the new image, version \(daemon.version ?? unknown) (was "
                  + "\(before.daemon.map { $0.version ?? unknown } ?? unknown)); workers adopted: "
                  + adopted.joined(separator: ", "))
            return
        }
        throw CtlError.timeout("no new image of the daemon answered within \(Int(action.timeout)) s: "
            + "see its log (if the new binary exited, the workers still serve; start reuseportd again to adopt them)")
    }
}
