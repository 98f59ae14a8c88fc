#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A child process whose standard output (and, when asked, standard error) is read through a
/// pipe; stdin is /dev/null. The one way the tests, kernel-check and the benchmarks run a
/// program and capture what it prints. (The daemon is started by `TestDaemon` instead.)
public final class Subprocess {
    public let pid: pid_t
    private let output: OwnedDescriptor
    private let errorOutput: OwnedDescriptor?
    /// What the child wrote to stdout (and stderr, if captured) so far.
    public private(set) var bytes: [UInt8] = []
    public private(set) var errorBytes: [UInt8] = []
    private var status: WaitStatus?

    /// Starts `path` with `arguments` (argv[0] is `path`). `environment`: "NAME=value"
    /// entries, nil to inherit. Without `captureStandardError` the child's stderr is this
    /// process's.
    public init(_ path: String, _ arguments: [String], environment: [String]? = nil,
                captureStandardError: Bool = false) throws {
        // All ends close-on-exec: only this child (through the dup2 of a file action) holds the write ends.
        let stdout = try Syscall.pipe()
        let stderr = captureStandardError ? try Syscall.pipe() : nil
        var actions: [ProcessSpawn.FileAction] = [.duplicate(stdout.write.fd.rawValue, to: 1), .nullInput]
        if let stderr { actions.append(.duplicate(stderr.write.fd.rawValue, to: 2)) }
        // Nothing else: other tests' descriptors opened without O_CLOEXEC (Foundation's files)
        // would live on in the child.
        actions.append(.closeFrom(3))
        pid = try ProcessSpawn(path, arguments, environment: environment, fileActions: actions).start()
        // Closing them here also keeps the write ends open until the child has its copies.
        stdout.write.close()
        stderr?.write.close()
        output = stdout.read
        errorOutput = stderr?.read
    }

    /// Runs `path` to its end and returns how it ended, with its output.
    public static func run(_ path: String, _ arguments: [String], environment: [String]? = nil,
                           captureStandardError: Bool = false) throws -> (status: WaitStatus, output: String, errors: String) {
        let child = try Subprocess(path, arguments, environment: environment, captureStandardError: captureStandardError)
        guard let status = child.wait() else { throw HarnessError("\(path) (pid \(child.pid)) could not be reaped") }
        return (status, child.text, String(decoding: child.errorBytes, as: UTF8.self))
    }

    deinit {
        if status == nil {
            try? Syscall.kill(pid, SIGKILL)
            _ = wait(timeoutMs: 5000)
        }
    }

    /// Reads output until it ends or `timeoutMs` passes (nil: no limit); then reaps the
    /// child. Returns how it ended, or nil on timeout (the child is still running).
    public func wait(timeoutMs: Int? = nil) -> WaitStatus? {
        let deadline = timeoutMs.map { MonotonicClock.milliseconds() + $0 }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let open = [output, errorOutput].compactMap { $0 }.filter { !$0.isClosed }
            if open.isEmpty { break }
            let left = deadline.map { $0 - MonotonicClock.milliseconds() } ?? 1000
            if left <= 0 { return nil }
            guard let ready = try? Syscall.poll(open.map(\.fd), timeoutMs: Int32(min(left, 1000))) else { break }
            for pipe in open where ready.contains(pipe.fd) {
                guard let count = try? Syscall.read(pipe.fd, into: &buffer), count > 0 else {
                    pipe.close()
                    continue
                }
                if pipe === output { bytes += buffer[0..<count] } else { errorBytes += buffer[0..<count] }
            }
        }
        return reap(timeoutMs: deadline.map { max($0 - MonotonicClock.milliseconds(), 0) })
    }

    /// Waits for the child to exit, at most `timeoutMs` (nil: no limit).
    public func reap(timeoutMs: Int? = nil) -> WaitStatus? {
        if let status { return status }
        let deadline = MonotonicClock.milliseconds() + (timeoutMs ?? 0)
        while true {
            do {
                if let (_, status) = try Syscall.wait(pid, block: timeoutMs == nil) {
                    self.status = status
                    return status
                }
            } catch {
                return nil
            }
            if MonotonicClock.milliseconds() >= deadline { return nil }
            usleep(20_000)
        }
    }

    /// Standard output as text.
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}
