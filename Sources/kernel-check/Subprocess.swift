#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A child process whose standard output is read through a pipe (stderr is inherited).
/// (The daemon is started by ReuseportTestSupport's TestDaemon instead.)
final class Subprocess {
    let pid: pid_t
    private var outputFD: Int32
    private(set) var output: [UInt8] = []
    private var status: Int32?

    /// Starts `path` with `arguments` (argv[0] is `path`).
    init(_ path: String, _ arguments: [String], environment: [String]? = nil) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw ReuseportError.system(call: "pipe", errno: errno, hint: nil) }
        // Close-on-exec, so that only this child (through the dup2 below) holds the write end.
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let envp = environment.map { $0.map { strdup($0) } + [nil] }
        defer { envp?.forEach { free($0) } }
        var pid: pid_t = 0
        let result = envp.map { posix_spawn(&pid, path, &actions, nil, argv, $0) }
            ?? posix_spawn(&pid, path, &actions, nil, argv, environ)
        close(fds[1])
        guard result == 0 else {
            close(fds[0])
            throw ReuseportError.system(call: "posix_spawn(\(path))", errno: result, hint: nil)
        }
        self.pid = pid
        self.outputFD = fds[0]
    }

    deinit {
        if status == nil {
            kill(pid, SIGKILL)
            _ = wait(timeoutMs: 5000)
        }
        if outputFD >= 0 { close(outputFD) }
    }

    /// Reads output until it ends or `timeoutMs` passes; then reaps the child. Returns the
    /// wait status, or nil on timeout (the child is still running).
    func wait(timeoutMs: Int) -> Int32? {
        let deadline = monotonicMilliseconds() + timeoutMs
        var buffer = [UInt8](repeating: 0, count: 4096)
        while outputFD >= 0 {
            let left = deadline - monotonicMilliseconds()
            if left <= 0 { return nil }
            var pfd = pollfd(fd: outputFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(left, 1000)))
            if ready < 0 && errno != EINTR { break }
            if ready <= 0 { continue }
            let count = read(outputFD, &buffer, buffer.count)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 {
                close(outputFD)
                outputFD = -1
                break
            }
            output += buffer[0..<count]
        }
        return reap(timeoutMs: max(deadline - monotonicMilliseconds(), 0))
    }

    /// Waits for the child to exit, at most `timeoutMs`.
    func reap(timeoutMs: Int) -> Int32? {
        if let status { return status }
        let deadline = monotonicMilliseconds() + timeoutMs
        while true {
            var raw: Int32 = 0
            let result = waitpid(pid, &raw, WNOHANG)
            if result == pid {
                status = raw
                return raw
            }
            if result < 0 && errno != EINTR { return nil }
            if monotonicMilliseconds() >= deadline { return nil }
            usleep(20_000)
        }
    }

    var text: String { String(decoding: output, as: UTF8.self) }

    /// "exit 3", "signal 9".
    static func describe(_ status: Int32) -> String {
        let signal = status & 0x7f
        return signal == 0 ? "exit \((status >> 8) & 0xff)" : "signal \(signal)"
    }
}
