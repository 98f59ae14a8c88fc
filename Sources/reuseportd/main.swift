#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Logging
import ReuseportControl
import ReuseportDaemon
import ReuseportKit

/// Exit statuses: 0 stopped cleanly, 1 could not start or failed at run time, 2 invalid
/// configuration (or a configuration file, program, pin root or run folder that anyone but
/// root could change), 64 bad command line (ArgumentParser's usage error).
@main
struct Reuseportd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reuseportd",
        abstract: "Own SO_REUSEPORT sockets, steer flows with eBPF, and keep a worker on every slot.",
        usage: """
            reuseportd [--config FILE] [--pin-dir DIR] [--run-dir DIR] [--check] [--log-level LEVEL]
            reuseportd worker echo|whoami
            reuseportd --version
            """,
        discussion: """
            The daemon's options are those of 'run', the default subcommand (see 'reuseportd help run'). \
            Without --config it runs the built-in demo: service "demo" on udp://127.0.0.1:5300 with 4 whoami \
            workers. SIGHUP reloads the configuration; SIGTERM or SIGINT stops gracefully. \
            The configuration file, the operations and the exit statuses: configuration.md and operations.md in \
            /usr/share/doc/reuseportd/.
            """,
        version: BuildVersion.string,
        subcommands: [Run.self, Worker.self, ExecWorker.self, CheckConfig.self],
        defaultSubcommand: Run.self
    )
}

extension Reuseportd {
    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run the daemon (the default).")

        @Option(name: .long, help: "The TOML configuration file (default: the built-in demo).")
        var config: String?

        @Option(name: .long, help: "Where the maps are pinned on bpffs, one folder per service.")
        var pinDir: String = PinLayout.defaultRoot

        @Option(name: .long, help: "Where the control socket lives.")
        var runDir: String = ControlDefaults.runDirectory

        @Flag(name: .long, help: "Check the configuration, print it in short and exit (0: valid, 2: invalid).")
        var check = false

        @Option(name: .long, help: "trace, debug, info, notice, warning, error or critical.")
        var logLevel: String = "info"

        func validate() throws {
            guard Logger.Level(rawValue: logLevel) != nil else {
                throw ValidationError("--log-level \(logLevel): use trace, debug, info, notice, warning, error or critical")
            }
        }

        func run() throws {
            let configuration: DaemonConfiguration
            do {
                configuration = try Daemon.loadConfiguration(path: config)
            } catch {
                printError("reuseportd: invalid configuration: \(error)")
                throw ExitCode(2)
            }
            if check {
                for service in configuration.services {
                    print("\(service.name): \(service.listen.map(\.description).joined(separator: ", ")), "
                        + "\(service.workers) workers")
                }
                return
            }
            let level = Logger.Level(rawValue: logLevel) ?? .info
            // Under systemd, stderr goes to the journal: priorities as <N>, no timestamps of our own.
            let journal = JournalLogHandler.isJournalStream()
            LoggingSystem.bootstrap { label in
                if journal { return JournalLogHandler(logLevel: level) }
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
            let logger = Logger(label: "reuseportd")
            // First, so that the log says which build ran, also after a reexec or a package upgrade.
            logger.notice("reuseportd \(BuildVersion.string) starting (pid \(getpid()))")
            let daemon: Daemon
            do {
                daemon = try Daemon(configuration: configuration,
                                    options: .init(configPath: config, pinRoot: pinDir, runDirectory: runDir,
                                                   executable: selfExecutable()),
                                    logger: logger)
            } catch let error as UntrustedPathError {
                printError("reuseportd: refusing to start: \(error)")
                throw ExitCode(2)
            } catch {
                printError("reuseportd: cannot start: \(error)")
                throw ExitCode(1)
            }
            logger.notice("ready: control socket \(ControlDefaults.socketPath(runDirectory: runDir))")
            do {
                try daemon.run()
            } catch {
                logger.critical("\(error)")
                throw ExitCode(1)
            }
        }
    }

    struct Worker: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a built-in worker on the sockets passed the systemd way (LISTEN_FDS from fd 3).",
            discussion: """
                echo returns each datagram (TCP: the stream) unchanged. whoami answers each datagram (TCP: each \
                line) with "slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>", a newline, then the payload.
                Works under reuseportd and under systemd-socket-activate, e.g.:
                  systemd-socket-activate --datagram -l 127.0.0.1:5301 reuseportd worker whoami
                """)

        @Argument(help: "echo or whoami.")
        var kind: BuiltinKindArgument

        func run() throws {
            do {
                try BuiltinWorker(kind: kind.kind, sockets: ActivatedSockets.fromEnvironment()).run()
            } catch {
                printError("reuseportd worker \(kind.kind.rawValue): \(error)")
                throw ExitCode(1)
            }
        }
    }

    /// The first step of every worker start (see WorkerLaunch.swift). Not for people.
    struct ExecWorker: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "exec-worker", abstract: "Internal: become a worker (drop privileges, set LISTEN_PID, exec).",
            shouldDisplay: false)

        @Option(help: "The daemon's pid: the worker does not start if its parent is another process.")
        var parent: Int32

        @Option(help: "Run as this user.")
        var user: String?

        @Option(help: "Run with this group.")
        var group: String?

        @Option(help: "Run this built-in worker instead of a program.")
        var builtin: BuiltinKindArgument?

        @Option(help: "Join this cgroup v2 folder first.")
        var cgroup: String?

        @Argument(parsing: .postTerminator, help: "The program and its arguments.")
        var command: [String] = []

        func validate() throws {
            guard (builtin == nil) != command.isEmpty else {
                throw ValidationError("give either --builtin KIND or -- PROGRAM ARGS...")
            }
        }

        func run() throws {
            let program: WorkerProgram = builtin.map { .builtin($0.kind) } ?? .exec(command)
            do {
                try WorkerExec(parent: parent, user: user, group: group, program: program, cgroup: cgroup).run()
            } catch {
                printError("reuseportd exec-worker: \(error)")
                throw ExitCode(127)
            }
        }
    }
}

extension Reuseportd {
    /// How the daemon reads its file on reload (see ConfigurationCheck.swift). Not for people.
    struct CheckConfig: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "check-config",
            abstract: "Internal: parse and check the configuration, write it as JSON (0: valid, 2: invalid).",
            shouldDisplay: false)

        @Option(help: "The TOML configuration file (default: the built-in demo).")
        var config: String?

        func run() throws {
            let (json, valid) = ConfigurationCheck.outcome(path: config)
            do {
                try json.withUnsafeBytes { try Syscall.writeAll(.standardOutput, $0, "write(stdout)") }
            } catch {
                throw ExitCode(1)
            }
            if !valid { throw ExitCode(2) }
        }
    }
}

struct BuiltinKindArgument: ExpressibleByArgument {
    var kind: BuiltinWorkerKind

    init?(argument: String) {
        guard let kind = BuiltinWorkerKind(rawValue: argument) else { return nil }
        self.kind = kind
    }

    static var allValueStrings: [String] { BuiltinWorkerKind.allCases.map(\.rawValue) }
}

func printError(_ text: String) {
    try? Array((text + "\n").utf8).withUnsafeBytes { try Syscall.writeAll(.standardError, $0, "write(stderr)") }
}

/// This binary's path, to spawn as `exec-worker` (resolved rather than /proc/self/exe so
/// that workers show up as reuseportd in ps and top, not as "exe").
func selfExecutable() -> String {
    Syscall.executablePath() ?? CommandLine.arguments[0]
}
