#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// The read end of a worker's stdout/stderr pipe: each line goes to the daemon's log,
/// labelled with service, slot and pid. It is closed at end of file, which comes when
/// the worker and every child it handed the pipe to have exited.
final class WorkerOutput {
    let descriptor: OwnedDescriptor
    /// Labelled with service and slot; the pid is added once the worker is spawned.
    var logger: Logger
    private var pending: [UInt8] = []
    static let longestLine = 4096

    /// Creates the pipe; `writeEnd` goes to the child, and closes when the caller lets it go
    /// after spawning.
    static func pipe(logger: Logger) throws -> (WorkerOutput, writeEnd: OwnedDescriptor) {
        let ends = try Syscall.pipe()
        // Only the daemon's end is non-blocking: the worker's writes block as usual.
        try ends.read.setNonBlocking(true)
        return (WorkerOutput(descriptor: ends.read, logger: logger), ends.write)
    }

    private init(descriptor: OwnedDescriptor, logger: Logger) {
        self.descriptor = descriptor
        self.logger = logger
    }

    /// Reads what is there; false at end of file (then the pipe is closed).
    func readAvailable() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let count: Int?
            do {
                count = try Syscall.read(descriptor.fd, into: &buffer)
            } catch {
                break
            }
            guard let count else { return true }
            if count == 0 { break }
            pending += buffer[0..<count]
            emitLines()
        }
        finish()
        return false
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
        descriptor.close()
    }
}
