#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import Logging

/// The read end of a worker's stdout/stderr pipe: each line goes to the daemon's log,
/// labelled with service, slot and pid. It is closed at end of file, which comes when
/// the worker and every child it handed the pipe to have exited.
final class WorkerOutput {
    let fd: Int32
    /// Labelled with service and slot; the pid is added once the worker is spawned.
    var logger: Logger
    private var pending: [UInt8] = []
    static let longestLine = 4096

    /// Creates the pipe; `writeEnd` goes to the child and must be closed by the caller after spawning.
    static func pipe(logger: Logger) throws(WorkerError) -> (WorkerOutput, writeEnd: Int32) {
        var ends: [Int32] = [-1, -1]
        guard rpd_pipe_cloexec(&ends) == 0 else { throw WorkerError.system("pipe2") }
        // Only the daemon's end is non-blocking: the worker's writes block as usual.
        _ = fcntl(ends[0], F_SETFL, fcntl(ends[0], F_GETFL) | O_NONBLOCK)
        return (WorkerOutput(fd: ends[0], logger: logger), ends[1])
    }

    private init(fd: Int32, logger: Logger) {
        self.fd = fd
        self.logger = logger
    }

    /// Reads what is there; false at end of file (then the pipe is closed).
    func readAvailable() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count > 0 {
                pending += buffer[0..<count]
                emitLines()
                continue
            }
            if count < 0 && (errno == EAGAIN || errno == EINTR) { return true }
            finish()
            return false
        }
    }

    private func emitLines() {
        while let newline = pending.firstIndex(of: 0x0a) {
            log(pending[..<newline])
            pending.removeSubrange(...newline)
        }
        if pending.count >= WorkerOutput.longestLine {
            log(pending[...])
            pending.removeAll()
        }
    }

    private func log(_ line: ArraySlice<UInt8>) {
        logger.info("\(String(decoding: line, as: UTF8.self))")
    }

    private func finish() {
        if !pending.isEmpty { log(pending[...]) }
        pending.removeAll()
        close(fd)
    }
}
