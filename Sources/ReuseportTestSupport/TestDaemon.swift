#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import Synchronization

/// Failures of a test harness itself, with what it was waiting for and the daemon's log.
public struct HarnessError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Monotonic milliseconds, for timing in tests.
public func nowMs() -> Double { Double(MonotonicClock.nanoseconds()) / 1_000_000 }

public func sleepMs(_ ms: Int) { usleep(useconds_t(max(ms, 0) * 1000)) }

/// Waits for the child `pid` to exit; returns its exit status (or 128 + signal), nil on timeout.
public func waitExit(_ pid: pid_t, timeoutMs: Int) -> Int32? {
    let deadline = nowMs() + Double(timeoutMs)
    while true {
        do {
            if let reaped = try Syscall.wait(pid, block: false) { return reaped.status.shellStatus }
        } catch {
            return nil
        }
        if nowMs() > deadline { return nil }
        sleepMs(10)
    }
}

/// Whether a process with this pid exists (and is not a zombie of ours).
public func processExists(_ pid: pid_t) -> Bool {
    guard (try? Syscall.kill(pid, 0)) != nil else { return false }
    let status = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
    return !status.contains(") Z ")
}

/// The executables built beside the running one (`swift build` puts every product, and the
/// test bundle, in one folder).
public enum BuiltProducts {
    /// This program's own path (/proc/self/exe), to find its siblings or start a second instance.
    public static let selfPath = Syscall.executablePath() ?? "/proc/self/exe"

    public static var directory: String { String(selfPath[..<(selfPath.lastIndex(of: "/") ?? selfPath.startIndex)]) }

    public static func path(_ name: String) -> String { "\(directory)/\(name)" }
}

/// Pin roots of tests: each a folder of its own under the bpffs mount point, never the
/// daemon's default (/sys/fs/bpf/reuseportd), so that no test sees what another test or an
/// earlier run left there.
public enum TestPinRoot {
    private static let made = Atomic<Int>(0)

    /// `/sys/fs/bpf/reuseportd-test-<pid>-<label>`.
    public static func path(_ label: String) -> String {
        "\(BPFFilesystem.mountPoint)/reuseportd-test-\(getpid())-\(label)"
    }

    /// A root no other caller in this process gets.
    public static func unique(_ label: String = "daemon") -> String {
        path("\(label)\(made.add(1, ordering: .relaxed).newValue)")
    }

    /// Removes every service pinned under `root`, then `root` itself.
    public static func remove(_ root: String) {
        for service in PinLayout.services(under: root) { PinLayout(root: root, service: service).remove() }
        rmdir(root)
    }
}

/// A temporary folder, removed with its contents.
public final class TemporaryDirectory: Sendable {
    public let path: String

    public init(_ prefix: String = "reuseportd-test") throws {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp: \(String(cString: strerror(errno)))") }
        path = String(cString: made)
    }

    /// Writes `text` to `name` in the folder; returns its path.
    @discardableResult
    public func write(_ name: String, _ text: String) throws -> String {
        let file = "\(path)/\(name)"
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// One run of the real reuseportd with its own configuration, pin root, run folder and log,
/// for the tests, the kernel-feature suite and the benchmarks. Asks it for its state over
/// the control socket (`status`), never from its log.
public final class TestDaemon {
    public let directory: TemporaryDirectory
    public let configPath: String
    public let pinRoot: String
    public let runDirectory: String
    public let logPath: String
    public let pid: pid_t
    public let control: ControlClient
    private var exitStatus: Int32?

    /// The daemon built beside this program.
    public static var builtBinary: String { BuiltProducts.path("reuseportd") }

    /// `REUSEPORT_TEST_LAUNCHER`, split on spaces; empty when unset.
    public static var defaultLauncher: [String] {
        (getenv("REUSEPORT_TEST_LAUNCHER").map { String(cString: $0) } ?? "").split(separator: " ").map(String.init)
    }
    public static var isBuilt: Bool { access(builtBinary, X_OK) == 0 }

    /// Starts `binary` with `config`. `pinRoot`: reuse another run's pin root (default: a
    /// fresh one). `logLevel`: nil leaves the daemon's default. `launcher`: a command that
    /// execs the daemon's command line given after it (e.g. `setpriv … --`); the daemon keeps
    /// the launcher's pid. The default is `REUSEPORT_TEST_LAUNCHER` (words split on spaces), so
    /// that a whole suite can run its daemons under, say, `setpriv` (`make test-least-privilege`).
    /// `environment`: variables set for the daemon on top of this process's (`NOTIFY_SOCKET`, say).
    /// `listening`: descriptors handed over as systemd hands over its fd store (sd_listen_fds(3)):
    /// at fd 3 on, with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (set by a shell that
    /// then execs the daemon, since only the child knows its pid).
    /// `runDirectory`: the run folder (default: `run` in this run's temporary folder, which only
    /// root may search, as mkdtemp(3) makes it 0700).
    public init(config: String, binary: String = TestDaemon.builtBinary, pinRoot: String? = nil, runDirectory: String? = nil,
                logLevel: String? = "debug", launcher: [String] = TestDaemon.defaultLauncher,
                environment: [String: String] = [:], listening: [(descriptor: Int32, name: String)] = []) throws {
        guard access(binary, X_OK) == 0 else { throw HarnessError("no reuseportd binary at \(binary): run swift build") }
        directory = try TemporaryDirectory()
        configPath = try directory.write("reuseportd.toml", config)
        self.pinRoot = pinRoot ?? TestPinRoot.unique()
        self.runDirectory = runDirectory ?? "\(directory.path)/run"
        logPath = "\(directory.path)/daemon.log"
        control = ControlClient(runDirectory: self.runDirectory)
        var environment = environment
        var launcher = launcher
        if !listening.isEmpty {
            environment["LISTEN_FDS"] = "\(listening.count)"
            environment["LISTEN_FDNAMES"] = listening.map(\.name).joined(separator: ":")
            launcher = ["/bin/sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"] + launcher
        }
        pid = try spawn(launcher
                        + [binary, "--config", configPath, "--pin-dir", self.pinRoot, "--run-dir", self.runDirectory]
                        + (logLevel.map { ["--log-level", $0] } ?? []), output: logPath,
                    environment: environment.isEmpty ? nil
                        : ProcessInfo.processInfo.environment.merging(environment) { $1 }.map { "\($0.key)=\($0.value)" },
                    passing: listening.map(\.descriptor))
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// The last `lines` lines of the log, on one line, for a failure message.
    public func logTail(_ lines: Int = 5) -> String {
        log.split(separator: "\n").suffix(lines).joined(separator: " | ")
    }

    /// Copies the log where it outlives the test's temporary folder (`REUSEPORT_TEST_LOGS`, by
    /// default /tmp/reuseportd-test-logs) and returns its path, for a failure message.
    @discardableResult
    public func keepLog() -> String {
        let folder = ProcessInfo.processInfo.environment["REUSEPORT_TEST_LOGS"] ?? "/tmp/reuseportd-test-logs"
        try? FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        let kept = "\(folder)/daemon-\(pid)-\(Int(Date().timeIntervalSince1970)).log"
        return (try? FileManager.default.copyItem(atPath: logPath, toPath: kept)) != nil ? kept : logPath
    }

    public func rewriteConfig(_ config: String) throws {
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// A connected client of the control socket: the caller owns the number and closes it.
    public func connectControl() throws -> Int32 { try control.connect().release() }

    /// Writes `bytes` to the control socket as they are and reads until the daemon's answer
    /// line ends or it closes. Returns what arrived (nil: closed without a byte).
    public func exchange(_ bytes: [UInt8]) throws -> [UInt8]? {
        try control.exchange(Data(bytes)).map { Array($0) }
    }

    /// Sends one request on the control socket and reads the answer.
    public func request(_ request: ControlRequest) throws -> ControlResponse { try control.send(request) }

    public func status() throws -> [ServiceStatus] {
        let response = try request(ControlRequest(command: .status))
        guard response.ok, let services = response.services else {
            throw HarnessError("status failed: \(response.error ?? "?")")
        }
        return services
    }

    /// Waits until the daemon answers and `condition` holds for its status.
    @discardableResult
    public func waitFor(_ what: String, timeoutMs: Int = 30_000, _ condition: ([ServiceStatus]) -> Bool) throws
        -> [ServiceStatus]
    {
        let deadline = nowMs() + Double(timeoutMs)
        var last = "no answer"
        while nowMs() < deadline {
            if let status = checkExited() {
                throw HarnessError("reuseportd exited with status \(status) while waiting for \(what); log:\n\(log)")
            }
            do {
                let services = try status()
                if condition(services) { return services }
                last = "\(services)"
            } catch {
                last = "\(error)"
            }
            sleepMs(20)
        }
        throw HarnessError("timed out after \(timeoutMs) ms waiting for \(what); last: \(last); log:\n\(log)")
    }

    /// Waits until every slot of every service has a worker in state `state`.
    @discardableResult
    public func waitForWorkers(_ state: String = "running", timeoutMs: Int = 30_000) throws -> [ServiceStatus] {
        try waitFor("every worker \(state)", timeoutMs: timeoutMs) { services in
            services.allSatisfy { $0.slots.allSatisfy { $0.state == state && $0.pid != nil } }
        }
    }

    public func signal(_ signal: Int32) { try? Syscall.kill(pid, signal) }

    /// The exit status once the daemon has exited (reaping it): its code, or 128 + signal.
    public func checkExited() -> Int32? {
        if exitStatus == nil { exitStatus = waitExit(pid, timeoutMs: 0) }
        return exitStatus
    }

    public func waitForExit(timeoutMs: Int) -> Int32? {
        if exitStatus == nil { exitStatus = waitExit(pid, timeoutMs: timeoutMs) }
        return exitStatus
    }

    /// SIGTERM (a graceful stop: workers, sockets, pins), SIGKILL if that takes longer than
    /// `timeoutMs`. Returns the exit status.
    @discardableResult
    public func stop(timeoutMs: Int = 15_000) -> Int32? {
        if let status = checkExited() { return status }
        signal(SIGTERM)
        if let status = waitForExit(timeoutMs: timeoutMs) { return status }
        signal(SIGKILL)
        return waitForExit(timeoutMs: 5000)
    }

    /// The workers the pins under this run's pin root name (pid with the start time published
    /// beside it, so a reused pid is never taken for one), by service: the slots' workers
    /// (rp_slot_state), then with `leaving`, those that left their slot and still run (rp_leaving).
    public func pinnedWorkers(leaving: Bool = false) -> [String: [pid_t]] {
        var found: [String: [pid_t]] = [:]
        for service in PinLayout.services(under: pinRoot) {
            let layout = PinLayout(root: pinRoot, service: service)
            guard let maps = try? DispatchMaps(pinned: layout) else { continue }
            for slot in 0..<UInt32(RP_MAX_SLOTS) {
                guard let row = try? maps.readSlotState(slot), row.pid != 0,
                      (try? Syscall.processStartTime(pid_t(row.pid))) == row.start_time
                else { continue }
                found[service, default: []].append(pid_t(row.pid))
            }
            guard leaving else { continue }
            for record in (try? LeavingRecords.pinned(at: layout)) ?? []
            where (try? Syscall.processStartTime(record.pid)) == record.value.start_time {
                found[service, default: []].append(record.pid)
            }
        }
        return found
    }

    /// SIGKILL to the process group of every worker the pins name, leaving ones included: workers
    /// outlive a daemon that was killed (a later daemon adopts them), so a test that kills one
    /// cleans up here.
    public func killPinnedWorkers() {
        for pid in pinnedWorkers(leaving: true).values.joined() { try? Syscall.kill(-pid, SIGKILL) }
    }

    /// Kills what is left: the daemon, then its workers (they outlive it), and removes any pins
    /// a killed daemon could not.
    deinit {
        if checkExited() == nil {
            signal(SIGKILL)
            _ = waitExit(pid, timeoutMs: 5000)
        }
        killPinnedWorkers()
        TestPinRoot.remove(pinRoot)
    }
}
