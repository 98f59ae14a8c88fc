#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import SystemPackage

/// Reads the configuration file for a reload in a short-lived child: this binary run as the
/// hidden `reuseportd check-config`, which parses and checks the file and writes the result
/// to its stdout as one JSON value (`Outcome`).
///
/// Why a child: the TOML parser (TOMLKit over toml++) never frees the tables it makes, about
/// 2 kB per parse, so a long-lived daemon that parsed on every reload would grow without end.
/// It also keeps the parsing of a file an operator hands in out of the root process. The
/// start-up parse (and `--check`) stays in process: it happens once.
public enum ConfigurationCheck {
    /// What the child writes: the checked configuration, or why the file was refused.
    public enum Outcome: Codable, Sendable {
        case valid(DaemonConfiguration)
        case invalid(ConfigurationError)
    }

    /// The child's side: reads `path` (nil: the built-in demo) and returns the JSON line to
    /// write, and whether the file was valid.
    public static func outcome(path: String?) -> (json: Data, valid: Bool) {
        let outcome: Outcome
        do {
            outcome = .valid(try Daemon.loadConfiguration(path: path))
        } catch {
            outcome = .invalid(error)
        }
        var json = (try? JSONEncoder().encode(outcome)) ?? Data()
        json.append(0x0a)
        if case .valid = outcome { return (json, true) }
        return (json, false)
    }

    /// How long the child may take before it is killed (a FIFO given as the file would block
    /// its open() for ever; the daemon's loop waits for the child).
    static let timeoutMs = 10_000

    /// The daemon's side: runs `executable check-config` on `path` and returns the checked
    /// configuration. Blocks the loop for the child's run (tens of milliseconds). Throws the
    /// file's `ConfigurationError`, or one saying why the check itself could not run.
    static func load(path: String?, executable: String) throws(ConfigurationError) -> DaemonConfiguration {
        let file = path ?? DaemonConfiguration.embeddedName
        func failed(_ why: String) -> ConfigurationError {
            ConfigurationError(file: file, problem: "cannot check the file in a child process: \(why)")
        }
        let output: [UInt8]
        let status: WaitStatus
        do {
            (output, status) = try run(executable, ["reuseportd", "check-config"] + (path.map { ["--config", $0] } ?? []))
        } catch {
            throw failed("\(error)")
        }
        guard let outcome = try? JSONDecoder().decode(Outcome.self, from: Data(output)) else {
            throw failed("it ended with \(status) and wrote no result")
        }
        switch outcome {
        case .valid(let configuration): return configuration
        case .invalid(let error): throw error
        }
    }

    /// Spawns the child with its stdout on a pipe (stderr stays the daemon's: the log), reads
    /// the pipe to its end and reaps the child; SIGKILL at `timeoutMs`.
    private static func run(_ executable: String, _ arguments: [String]) throws -> ([UInt8], WaitStatus) {
        let (readEnd, writeEnd) = try Syscall.pipe()
        let spawn = ProcessSpawn(path: executable, arguments: arguments,
                                 fileActions: [.nullInput, .duplicate(writeEnd.fd.rawValue, to: 1), .closeFrom(3)],
                                 resetSignals: true)
        let pid = try withExtendedLifetime(writeEnd) { try spawn.start() }
        // Only the child holds the write end now: end of file when it exits.
        writeEnd.close()
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        let deadline = MonotonicClock.nanoseconds() + timeoutMs.msAsNs
        while true {
            let left = deadline - MonotonicClock.nanoseconds()
            if left <= 0 {
                try? Syscall.kill(pid, SIGKILL)
                _ = try? Syscall.wait(pid, block: true)
                throw ReuseportError.invalidArgument("it did not finish in \(timeoutMs) ms: killed")
            }
            if try Syscall.poll([readEnd.fd], timeoutMs: Int32(clamping: (left + 999_999) / 1_000_000)).isEmpty {
                continue
            }
            guard let count = try Syscall.read(readEnd.fd, into: &buffer), count > 0 else { break }
            output += buffer[0..<count]
        }
        guard let (_, status) = try Syscall.wait(pid, block: true) else {
            throw ReuseportError.invalidArgument("waitpid(\(pid)) found no child")
        }
        return (output, status)
    }
}
