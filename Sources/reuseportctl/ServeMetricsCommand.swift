#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Dispatch
import FlyingFox
import FlyingSocks
import Foundation
import ReuseportKit

/// `serve-metrics`: the counters of `stats --prometheus` over HTTP for a Prometheus server.
///
/// Two processes, so that HTTP is never parsed as root:
/// - the keeper (this command, root) opens no socket and reads nothing but the names of the
///   pinned services. It starts the server as a child and, when the set of services changes
///   (pins cannot be opened again once root is dropped), starts a new one in its place;
/// - the server (the same binary with the hidden `--serving`) opens the pinned maps as root,
///   drops to `--user` for good (setgroups, setgid, setuid, then verified), and only then
///   binds the address and answers. Each scrape reads the maps through the fds it kept.
struct ServeMetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-metrics",
        abstract: "Serve the Prometheus metrics of every pinned service over HTTP (GET /metrics).",
        discussion: """
            Needs root to open the pins; the process that speaks HTTP runs as --user (default \
            nobody). The metrics are those of `stats --prometheus`, read at each scrape. A service \
            pinned later is served after the next check of the pin folder (every --rescan SECONDS), \
            by a new server process. The daemon's own counters (failovers, ...) need its control \
            socket, which is root's: they are in `stats --prometheus`, not here.

            Examples:
              reuseportctl serve-metrics
              reuseportctl serve-metrics --listen 127.0.0.1:9466 --user nobody
            """
    )

    static let defaultListen = "127.0.0.1:9466"

    @OptionGroup(title: "Locations") var location: LocationOptions

    @Option(help: ArgumentHelp("Address to serve on; loopback unless you mean otherwise.", valueName: "ADDR:PORT"))
    var listen: String = ServeMetricsCommand.defaultListen

    @Option(help: ArgumentHelp("The unprivileged user that serves HTTP.", valueName: "USER"))
    var user: String = "nobody"

    @Option(help: ArgumentHelp("Seconds between checks of the pin folder for services added or removed.",
                               valueName: "SECONDS"))
    var rescan: Double = 5

    @Flag(help: .hidden) var serving = false

    var address: ReuseportKit.SocketAddress {
        get throws { try ReuseportKit.SocketAddress(parsing: listen) }
    }

    func validate() throws {
        do {
            _ = try address
        } catch {
            throw ValidationError("--listen \(error)")
        }
        guard UserAccount.lookUp(user) != nil else { throw ValidationError("--user: no such user '\(user)'") }
        guard rescan.isFinite, rescan >= 0.1, rescan <= 3600 else {
            throw ValidationError("--rescan \(rescan) is outside 0.1...3600 seconds")
        }
    }

    func run() throws {
        guard getuid() == 0 else {
            throw CtlError.unanswerable("serve-metrics needs root to open the pinned maps (it then serves as \(user))")
        }
        if serving { return try MetricsServer(command: self).run() }
        try MetricsKeeper(command: self).run()
    }
}

/// The root process: restarts the server when the pinned services change, ends it on SIGTERM
/// or SIGINT, and exits with its status if it ends by itself (a port taken, say).
struct MetricsKeeper {
    var command: ServeMetricsCommand

    func run() throws {
        guard let executable = Syscall.executablePath() else {
            throw CtlError.unanswerable("cannot find this executable (/proc/self/exe) to start the server")
        }
        var signals = sigset_t()
        sigemptyset(&signals)
        for signal in [SIGINT, SIGTERM, SIGCHLD] { sigaddset(&signals, signal) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let arguments = Array(CommandLine.arguments.dropFirst()) + ["--serving"]
        while true {
            let services = PinLayout.services(under: command.location.pinDirectory).sorted()
            let server = try ProcessSpawn(path: executable, arguments: [executable] + arguments,
                                          resetSignals: true).start()
            switch try watch(server, services: services, signals: &signals) {
            case .servicesChanged:
                try? Syscall.kill(server, SIGTERM)
                _ = try Syscall.wait(server, block: true)
            case .stop(let signal):
                try? Syscall.kill(server, signal)
                _ = try Syscall.wait(server, block: true)
                return
            case .ended(let status):
                throw ExitCode(status.shellStatus == 0 ? 1 : status.shellStatus)
            }
        }
    }

    enum Event { case servicesChanged, stop(Int32), ended(WaitStatus) }

    /// Waits for a signal, the server's end or a change of the services. sigtimedwait(2) on
    /// blocked signals: this process has one thread, so nothing else takes them.
    private func watch(_ server: pid_t, services: [String], signals: inout sigset_t) throws -> Event {
        let interval = command.rescan
        while true {
            var timeout = timespec(tv_sec: Int(interval), tv_nsec: Int((interval - interval.rounded(.down)) * 1e9))
            var info = siginfo_t()
            let signal = sigtimedwait(&signals, &info, &timeout)
            if signal == SIGINT || signal == SIGTERM { return .stop(signal) }
            if signal == SIGCHLD, let (_, status) = try Syscall.wait(server, block: false) { return .ended(status) }
            if signal < 0 && errno != EAGAIN && errno != EINTR {
                throw ReuseportError.system("sigtimedwait", errno)
            }
            if PinLayout.services(under: command.location.pinDirectory).sorted() != services { return .servicesChanged }
        }
    }
}

/// What one scrape reads: the services opened as root, read again through their fds.
final class MetricsSource: @unchecked Sendable {
    private let reader: ServiceReader
    private let services: [OpenedService]
    private let unopened: Int
    /// Snapshots read the maps through shared BPFMap objects: one scrape at a time.
    private let lock = NSLock()

    init(reader: ServiceReader, names: [String]) {
        self.reader = reader
        var services: [OpenedService] = []
        var unopened = 0
        for name in names {
            do {
                services.append(try reader.open(name))
            } catch {
                unopened += 1
                writeStandardError("reuseportctl: serve-metrics: \(error)\n")
            }
        }
        self.services = services
        self.unopened = unopened
    }

    func exposition() -> String {
        lock.lock()
        defer { lock.unlock() }
        let (snapshots, failures) = reader.snapshots(of: services)
        return MetricsExposition.render(snapshots, unreadable: failures.count + unopened)
    }
}

/// The server process: opens the maps, drops root, then serves.
struct MetricsServer {
    var command: ServeMetricsCommand

    func run() throws {
        let address = try command.address
        let names = PinLayout.services(under: command.location.pinDirectory).sorted()
        let source = MetricsSource(reader: ServiceReader(root: command.location.pinDirectory), names: names)
        guard let account = UserAccount.lookUp(command.user) else {
            throw CtlError.unanswerable("no such user '\(command.user)'")
        }
        // Whoever took over the server after the drop gains nothing by exec (a set-user-ID program,
        // file capabilities), and its bounding set holds nothing to gain: what the unit's
        // NoNewPrivileges= and CapabilityBoundingSet= give it, also when it is started by hand as
        // root. Emptying the bounding set needs CAP_SETPCAP, which the unit does not leave.
        try Syscall.setNoNewPrivileges()
        if (try? Syscall.capabilities())?.effective.contains(.setpcap) == true {
            for capability in try Syscall.boundingSet().members { try Syscall.dropFromBoundingSet(capability) }
        }
        try Syscall.becomeUser(account)
        // Ends with the keeper, even if it is killed (SIGKILL) and cannot stop us.
        try Syscall.setParentDeathSignal(SIGTERM)

        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        Task {
            do {
                try await serve(source, on: address, as: account)
            } catch {
                outcome.error = error
            }
            done.signal()
        }
        done.wait()
        if let error = outcome.error { throw Self.explained(error, address: address) }
    }

    private final class Outcome: @unchecked Sendable { var error: Error? }

    private func serve(_ source: MetricsSource, on address: ReuseportKit.SocketAddress,
                       as account: UserAccount) async throws {
        let server: HTTPServer
        if address.address.isV4 {
            server = HTTPServer(address: try .inet(ip4: "\(address.address)", port: address.port), logger: .disabled)
        } else {
            server = HTTPServer(address: try .inet6(ip6: "\(address.address)", port: address.port), logger: .disabled)
        }
        await server.appendRoute("GET /metrics") { _ in
            HTTPResponse(statusCode: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: Data(source.exposition().utf8))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.run() }
            group.addTask {
                try await server.waitUntilListening(timeout: 10)
                var bound = "\(address)"
                switch await server.listeningAddress {
                case .ip4(let host, let port)?: bound = "\(host):\(port)"
                case .ip6(let host, let port)?: bound = "[\(host)]:\(port)"
                default: break
                }
                print("serving metrics on http://\(bound)/metrics as \(account), pid \(getpid())")
                fflushStandardOutput()
                try await Task.sleep(for: .seconds(Int64.max / 2))
            }
            try await group.next()
            group.cancelAll()
        }
    }

    /// FlyingFox's socket errors, said as this CLI says errors: the call, the errno, a hint.
    static func explained(_ error: Error, address: ReuseportKit.SocketAddress) -> Error {
        guard case .failed(let call, let code, let message)? = error as? SocketError else { return error }
        var text = "cannot serve on \(address): \(call.lowercased())(): \(message) (errno \(code))"
        switch code {
        case EADDRINUSE: text += "; another process listens there: stop it or choose another --listen ADDR:PORT"
        case EADDRNOTAVAIL: text += "; no interface has that address: choose another --listen ADDR:PORT"
        case EACCES: text += "; ports below 1024 need privileges the server does not keep: choose a port above 1023"
        default: break
        }
        return CtlError.unanswerable(text)
    }
}
