#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// The read end of a worker's stdout/stderr pipe: each line goes to the daemon's log,
/// labelled with service, slot and pid. It is closed at end of file, which comes when
/// the worker and every child it handed the pipe to have exited.
///
/// A worker may write faster than the daemon can log: it must not take the event loop from
/// the control socket, the signals and the other workers. So each loop round reads at most
/// one chunk of each pipe, a worker gets at most `bytesPerSecond` read a second (then its pipe
/// is not polled until the second is over: the pipe fills and the worker's writes block), and at
/// most `linesPerSecond` of its lines are logged a second; the lines beyond are dropped and
/// counted in `drops` (control `status`, per slot) and in one log line when the second ends.
final class WorkerOutput {
    let descriptor: OwnedDescriptor
    /// Labelled with service and slot; the pid is added once the worker is spawned.
    var logger: Logger
    /// The worker writing to it, once spawned.
    var pid: pid_t?
    /// The slot's drop counts (they outlive this worker).
    let drops: OutputDrops
    private var pending: [UInt8] = []
    static let longestLine = 4096
    /// The most one loop round reads of a pipe.
    static let chunkBytes = 16384
    static let bytesPerSecond = 1 << 20
    static let linesPerSecond = 1000
    /// The most `drain()` reads of a pipe at shutdown (a child outside the worker's process group
    /// may still hold its write end and write on).
    static let drainBytes = 4 << 20

    /// The current one-second window: when it began, what it has read and logged, what it dropped.
    private var windowStart: Int64
    private var windowBytes = 0
    private var windowLines = 0
    private var windowDroppedLines = 0
    private var windowDroppedBytes = 0

    /// Creates the pipe; `writeEnd` goes to the child, and closes when the caller lets it go
    /// after spawning.
    static func pipe(logger: Logger, drops: OutputDrops) throws -> (WorkerOutput, writeEnd: OwnedDescriptor) {
        let ends = try Syscall.pipe()
        // Only the daemon's end is non-blocking: the worker's writes block as usual.
        try ends.read.setNonBlocking(true)
        return (WorkerOutput(descriptor: ends.read, logger: logger, drops: drops), ends.write)
    }

    /// The read end of a pipe a worker writes to, kept open across the daemon's exec of itself
    /// (`Daemon.reexec`): the worker's output goes on being logged, and nothing is lost.
    static func inherited(_ descriptor: OwnedDescriptor, logger: Logger, drops: OutputDrops) throws -> WorkerOutput {
        try Syscall.setCloseOnExec(descriptor.fd, true)
        try descriptor.setNonBlocking(true)
        return WorkerOutput(descriptor: descriptor, logger: logger, drops: drops)
    }

    private init(descriptor: OwnedDescriptor, logger: Logger, drops: OutputDrops) {
        self.descriptor = descriptor
        self.logger = logger
        self.drops = drops
        windowStart = MonotonicClock.nanoseconds()
    }

    /// Until when the pipe is not polled (this second's byte budget is spent); nil while it is.
    func pausedUntil(now: Int64) -> Int64? {
        let end = windowStart + 1_000_000_000
        return windowBytes >= WorkerOutput.bytesPerSecond && now < end ? end : nil
    }

    /// Reads one chunk, at most what is left of this second's budget; false at end of file
    /// (then the pipe is closed).
    func readChunk(now: Int64) -> Bool {
        roll(now: now)
        let budget = min(WorkerOutput.chunkBytes, WorkerOutput.bytesPerSecond - windowBytes)
        guard budget > 0 else { return true }
        var buffer = [UInt8](repeating: 0, count: budget)
        let read: Int?
        do {
            read = try Syscall.read(descriptor.fd, into: &buffer)
        } catch {
            // A pipe that fails to read ends as it does at end of file.
            finish()
            return false
        }
        guard let count = read else { return true }  // EAGAIN: nothing now
        if count == 0 {
            finish()
            return false
        }
        windowBytes += count
        pending += buffer[0..<count]
        emitLines()
        return true
    }

    /// Reads what the pipe still holds, up to `drainBytes`, then closes it (at shutdown).
    func drain() {
        var buffer = [UInt8](repeating: 0, count: WorkerOutput.chunkBytes)
        var total = 0
        while total < WorkerOutput.drainBytes, let count = try? Syscall.read(descriptor.fd, into: &buffer), count > 0 {
            total += count
            pending += buffer[0..<count]
            emitLines()
        }
        finish()
    }

    /// Starts a new window once a second has passed, logging what the last one dropped.
    private func roll(now: Int64) {
        guard now - windowStart >= 1_000_000_000 else { return }
        reportDrops()
        windowStart = now
        windowBytes = 0
        windowLines = 0
    }

    private func reportDrops() {
        guard windowDroppedLines > 0 else { return }
        let limit = "more than \(WorkerOutput.linesPerSecond) lines a second (drops are counted in control status)"
        logger.warning("dropped \(windowDroppedLines) lines (\(windowDroppedBytes) bytes) of this worker's output: \(limit)")
        windowDroppedLines = 0
        windowDroppedBytes = 0
    }

    private func emitLines() {
        // memchr: a flooding worker sends tens of thousands of lines a chunk, and most are
        // only counted as dropped; this must stay cheap in a debug build too.
        let ends: [Int] = pending.withUnsafeBufferPointer { bytes in
            guard let base = bytes.baseAddress else { return [] }
            var ends: [Int] = []
            var offset = 0
            while offset < bytes.count, let found = memchr(base + offset, 0x0a, bytes.count - offset) {
                let newline = base.distance(to: found.assumingMemoryBound(to: UInt8.self))
                ends.append(newline)
                offset = newline + 1
            }
            return ends
        }
        var start = 0
        for (number, newline) in ends.enumerated() {
            if windowLines >= WorkerOutput.linesPerSecond {
                let end = ends[ends.count - 1] + 1
                drop(lines: ends.count - number, bytes: end - start)
                start = end
                break
            }
            log(pending[start..<newline])
            start = newline + 1
        }
        pending.removeSubrange(..<start)
        if pending.count >= WorkerOutput.longestLine {
            log(pending[...])
            pending.removeAll()
        }
    }

    private func log(_ line: ArraySlice<UInt8>) {
        guard windowLines < WorkerOutput.linesPerSecond else { return drop(lines: 1, bytes: line.count + 1) }
        windowLines += 1
        logger.info("\(String(decoding: line, as: UTF8.self))")
    }

    private func drop(lines: Int, bytes: Int) {
        windowDroppedLines += lines
        windowDroppedBytes += bytes
        drops.lines += lines
        drops.bytes += bytes
    }

    private func finish() {
        if !pending.isEmpty { log(pending[...]) }
        pending.removeAll()
        reportDrops()
        descriptor.close()
    }
}

/// Output lines of a slot's workers that were not logged (over `WorkerOutput.linesPerSecond`),
/// since the daemon started.
final class OutputDrops {
    var lines = 0
    var bytes = 0
}
