#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A child process whose standard output is read through a pipe (stderr is inherited).
/// (The daemon is started by ReuseportTestSupport's TestDaemon instead.)
final class Subprocess {
    let pid: pid_t
    private let output: OwnedDescriptor
    private(set) var bytes: [UInt8] = []
    private var status: WaitStatus?

    /// Starts `path` with `arguments` (argv[0] is `path`).
    init(_ path: String, _ arguments: [String], environment: [String]? = nil) throws {
        // Both ends close-on-exec: only this child (through the dup2 of a file action) holds the write end.
        let pipe = try Syscall.pipe()
        let actions: [ProcessSpawn.FileAction] = [.duplicate(pipe.write.fd.rawValue, to: 1), .nullInput]
        pid = try withExtendedLifetime(pipe.write) {
            try ProcessSpawn(path, arguments, environment: environment, fileActions: actions).start()
        }
        pipe.write.close()
        output = pipe.read
    }

    deinit {
        if status == nil {
            try? Syscall.kill(pid, SIGKILL)
            _ = wait(timeoutMs: 5000)
        }
    }

    /// Reads output until it ends or `timeoutMs` passes; then reaps the child. Returns how
    /// it ended, or nil on timeout (the child is still running).
    func wait(timeoutMs: Int) -> WaitStatus? {
        let deadline = MonotonicClock.milliseconds() + timeoutMs
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !output.isClosed {
            let left = deadline - MonotonicClock.milliseconds()
            if left <= 0 { return nil }
            guard let ready = try? Syscall.poll([output.fd], timeoutMs: Int32(min(left, 1000))) else { break }
            if ready.isEmpty { continue }
            let count: Int?
            do {
                count = try Syscall.read(output.fd, into: &buffer)
            } catch {
                count = 0
            }
            guard let count, count > 0 else {
                output.close()
                break
            }
            bytes += buffer[0..<count]
        }
        return reap(timeoutMs: max(deadline - MonotonicClock.milliseconds(), 0))
    }

    /// Waits for the child to exit, at most `timeoutMs`.
    func reap(timeoutMs: Int) -> WaitStatus? {
        if let status { return status }
        let deadline = MonotonicClock.milliseconds() + timeoutMs
        while true {
            do {
                if let (_, status) = try Syscall.wait(pid, block: false) {
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

    var text: String { String(decoding: bytes, as: UTF8.self) }

    /// This program's own path, to start a second instance of it.
    static var selfPath: String { Syscall.executablePath() ?? "/proc/self/exe" }
}
