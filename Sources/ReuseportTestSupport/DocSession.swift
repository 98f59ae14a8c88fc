#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit

/// Where a doc's commands run as written: a mount and network namespace of their own
/// (`unshare --mount --net`), with a new, empty bpffs at /sys/fs/bpf, a tmpfs at /run and its own
/// loopback. So `reuseportctl map dump` reads the default pin folder, `socat … /run/reuseportd/
/// control.sock` reaches the default run folder and `127.0.0.1:5300` is free, as on an operator's
/// machine, and nothing is shared with the host's pins, run folders, ports, other tests, or what an
/// earlier run left. A daemon started in it (`<!-- doctest: daemon ARGS -->`) is the built
/// reuseportd with the doc's arguments, nothing added. Commands run in the repository's root with
/// the built products first in PATH.
public final class DocSession {
    public let directory: TemporaryDirectory
    /// The process that holds the namespaces (`sleep`); commands enter them with nsenter.
    public let holder: pid_t
    public private(set) var daemon: pid_t?
    public let workingDirectory: String
    private let environment: [String]
    private var daemonLogs = 0

    public init(workingDirectory: String) throws {
        directory = try TemporaryDirectory("reuseportd-doc")
        self.workingDirectory = workingDirectory
        let ready = "\(directory.path)/ready"
        holder = try spawn(["/usr/bin/unshare", "--mount", "--net", "--propagation", "private", "--", "/bin/sh", "-c",
                            "mount -t bpf bpf /sys/fs/bpf && mount -t tmpfs -o mode=0755 tmpfs /run"
                            + " && ip link set lo up && touch \(ready) && exec sleep 100000"],
                           output: "\(directory.path)/holder.log")
        var variables = ProcessInfo.processInfo.environment
        variables["PATH"] = BuiltProducts.directory + ":" + (variables["PATH"] ?? "/usr/bin:/bin")
        for name in ["REUSEPORTCTL_NOW_NS", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "COLUMNS"] {
            variables[name] = nil
        }
        environment = variables.map { "\($0.key)=\($0.value)" }
        let deadline = nowMs() + 10_000
        while access(ready, F_OK) != 0 {
            if let status = waitExit(holder, timeoutMs: 0) {
                throw HarnessError("unshare exited with status \(status): \(holderLog)")
            }
            if nowMs() > deadline { throw HarnessError("the namespaces were not ready within 10 s: \(holderLog)") }
            sleepMs(10)
        }
    }

    var holderLog: String { (try? String(contentsOfFile: "\(directory.path)/holder.log", encoding: .utf8)) ?? "" }

    /// The daemon's control socket as seen from outside the namespace.
    public var control: ControlClient { ControlClient(runDirectory: "/proc/\(holder)/root\(ControlDefaults.runDirectory)") }

    public var daemonLogPath: String { "\(directory.path)/daemon-\(daemonLogs).log" }
    public var daemonLog: String { (try? String(contentsOfFile: daemonLogPath, encoding: .utf8)) ?? "" }

    /// Starts the built reuseportd with `arguments` in the namespaces (stopping the one before),
    /// and waits until every slot of every service has a running worker.
    public func startDaemon(_ arguments: [String], timeoutMs: Int = 30_000) throws {
        stopDaemon()
        daemonLogs += 1
        // In the repository's root, as the doc's commands: a relative --config is the doc's path.
        let pid = try spawn(["/usr/bin/nsenter", "-t", "\(holder)", "-m", "-n", "--", "/bin/sh", "-c",
                             "cd \"$0\" && exec \"$@\"", workingDirectory, BuiltProducts.path("reuseportd")]
                            + arguments, output: daemonLogPath, environment: environment)
        daemon = pid
        let deadline = nowMs() + Double(timeoutMs)
        var last = "no answer"
        while nowMs() < deadline {
            if let status = waitExit(pid, timeoutMs: 0) {
                daemon = nil
                throw HarnessError("reuseportd \(arguments) exited with status \(status); log:\n\(daemonLog)")
            }
            do {
                let response = try control.send(ControlRequest(command: .status))
                if let services = response.services,
                   services.allSatisfy({ $0.slots.allSatisfy { $0.state == "running" && $0.pid != nil } })
                {
                    return
                }
                last = "\(response.services ?? [])"
            } catch {
                last = "\(error)"
            }
            sleepMs(50)
        }
        throw HarnessError("reuseportd \(arguments): not every worker running after \(timeoutMs) ms; last: \(last)")
    }

    /// SIGTERM (a graceful stop ends the workers too), SIGKILL after 15 s.
    public func stopDaemon() {
        guard let pid = daemon else { return }
        try? Syscall.kill(pid, SIGTERM)
        if waitExit(pid, timeoutMs: 15_000) == nil {
            try? Syscall.kill(pid, SIGKILL)
            _ = waitExit(pid, timeoutMs: 5000)
        }
        daemon = nil
    }

    /// Runs `command` with /bin/sh in the namespaces, standard error into standard output (the doc
    /// shows them as one), at most `timeoutMs`.
    public func run(_ command: String, timeoutMs: Int = 300_000) throws -> (status: Int32, output: String) {
        let script = "cd '\(workingDirectory)' || exit 99\nexec 2>&1\n\(command)"
        let child = try Subprocess("/usr/bin/nsenter", ["-t", "\(holder)", "-m", "-n", "--", "/bin/sh", "-c", script],
                                   environment: environment)
        guard let status = child.wait(timeoutMs: timeoutMs) else {
            try? Syscall.kill(child.pid, SIGKILL)
            throw HarnessError("still running after \(timeoutMs / 1000) s: \(command)\noutput so far:\n\(child.text)")
        }
        return (status.shellStatus, child.text)
    }

    /// Everything left in the namespace (a daemon, its workers, a command that outlived its shell)
    /// is killed, then the holder: the namespaces, the bpffs and its pins go with the last process.
    deinit {
        stopDaemon()
        let ours = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(holder)/ns/net")
        for _ in 0..<3 {
            let members = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(Int32.init)
                .filter { $0 != holder && (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\($0)/ns/net")) == ours }
            if ours == nil || members.isEmpty { break }
            for pid in members { try? Syscall.kill(pid, SIGKILL) }
            sleepMs(100)
        }
        try? Syscall.kill(holder, SIGKILL)
        _ = waitExit(holder, timeoutMs: 5000)
    }
}
