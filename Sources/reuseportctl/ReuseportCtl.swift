import ArgumentParser
import ReuseportControl
import ReuseportKit

/// The operator CLI: reads the pinned maps directly (works while the daemon is wedged) and
/// talks to the daemon's control socket only for actions.
struct ReuseportCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reuseportctl",
        abstract: "See and steer a running reuseportd.",
        discussion: """
            Read-only commands (map dump, which, stats, features) read the maps the daemon pinned \
            on bpffs, so they work even when the daemon is wedged. Actions (restart, scale, upgrade, reload) \
            go through the daemon's control socket.

            Exit status: 0 success, 1 runtime error (no daemon, no pins, no such service), \
            2 bad arguments.

            Shell completions: reuseportctl --generate-completion-script bash|zsh|fish
            """,
        version: BuildVersion.string,
        subcommands: [
            MapCommand.self, WhichCommand.self, FlowsCommand.self, StatsCommand.self,
            RestartCommand.self, ScaleCommand.self, UpgradeCommand.self, ReloadCommand.self, DaemonCommand.self,
            FeaturesCommand.self, ServeMetricsCommand.self,
        ]
    )
}

/// Where the daemon keeps its state: shared by every command.
struct LocationOptions: ParsableArguments {
    @Option(name: .customLong("pin-dir"), help: ArgumentHelp("The daemon's bpffs pin folder.", valueName: "DIR"),
            completion: .directory)
    var pinDirectory: String = PinLayout.defaultRoot

    @Option(name: .customLong("run-dir"),
            help: ArgumentHelp("The daemon's run folder (holds \(ControlDefaults.socketName)).", valueName: "DIR"),
            completion: .directory)
    var runDirectory: String = ControlDefaults.runDirectory

    var controlSocket: String { ControlDefaults.socketPath(runDirectory: runDirectory) }

    func validate() throws {
        for (flag, value) in [("--pin-dir", pinDirectory), ("--run-dir", runDirectory)] where value.isEmpty {
            throw ValidationError("\(flag) needs a folder, not an empty string")
        }
    }
}

/// `--service NAME`: which service to look at; optional when only one is pinned.
struct ServiceOption: ParsableArguments {
    @Option(name: .shortAndLong,
            help: ArgumentHelp("The service (default: every service; actions: the only one).", valueName: "NAME"),
            completion: .custom { arguments, _, _ in
                // Complete from the --pin-dir already typed, if any.
                let root = arguments.firstIndex(of: "--pin-dir").flatMap { arguments.indices.contains($0 + 1) ? arguments[$0 + 1] : nil }
                return PinLayout.services(under: root ?? PinLayout.defaultRoot)
            })
    var service: String?

    func validate() throws {
        if let service, service.isEmpty || service.contains("/") {
            throw ValidationError("--service '\(service)' is not a service name (no '/' and not empty)")
        }
    }
}
