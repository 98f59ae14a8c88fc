#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// Log lines for journald when stderr is connected to it: each line starts with its syslog
/// priority as `<N>` (sd-daemon(3), which journald reads from a stream and strips), and carries
/// no timestamp or level word of its own, since the journal records both. The metadata
/// (`service=… slot=… pid=…`) and the message follow as in the plain format.
public struct JournalLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level

    public init(logLevel: Logger.Level) { self.logLevel = logLevel }

    /// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its
    /// device and inode (systemd.exec(5)), so stderr redirected elsewhere by a child shell or a
    /// wrapper is not mistaken for it.
    public static func isJournalStream() -> Bool {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var status = stat()
        guard fstat(STDERR_FILENO, &status) == 0 else { return false }
        return UInt64(status.st_dev) == device && UInt64(status.st_ino) == inode
    }

    /// syslog(3) priorities: trace and debug are LOG_DEBUG (7), critical is LOG_CRIT (2).
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        let fields = merged.keys.sorted().map { "\($0)=\(merged[$0]!)" }.joined(separator: " ")
        let prefix = "<\(JournalLogHandler.priority(event.level))>"
        // journald reads a stream line by line: every line of a message gets the priority.
        let text = prefix + (fields.isEmpty ? "" : fields + " ")
            + event.message.description.split(separator: "\n", omittingEmptySubsequences: false)
            .joined(separator: "\n" + prefix) + "\n"
        try? Array(text.utf8).withUnsafeBytes { try Syscall.writeAll(.standardError, $0, "write(stderr)") }
    }
}
