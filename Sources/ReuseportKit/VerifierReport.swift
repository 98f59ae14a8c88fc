#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// What the kernel's verifier said when it loaded a program: its log at the statistics level
/// (BPF_LOG_STATS, 5.2+), which carries the verdict and "processed N insns (limit 1000000)".
///
/// The processed count is the verifier's cost of the program: every instruction of every
/// path it had to explore. A program over 1,000,000 (BPF_COMPLEXITY_LIMIT_INSNS,
/// kernel/bpf/verifier.c) is refused as too large, and the count for the same object
/// changes from kernel to kernel as the verifier's pruning changes. kernel-check holds the
/// steering program to a budget far below the limit on every kernel it runs on.
public struct VerifierReport: Sendable, Equatable {
    /// The log as the kernel wrote it.
    public var log: String

    public init(log: String) { self.log = log }

    /// Loads every program of the BPF object at `bytes` (an ELF file in memory), then unloads
    /// them: what the verifier says of each, by program name. A refusal throws
    /// `ReuseportError.programRefused` with the verifier's verdict.
    public static func verify(object bytes: UnsafePointer<UInt8>, count: Int, name: String) throws
        -> [String: VerifierReport]
    {
        let object = try EmbeddedObject(bytes, count: count, name: name)
        try object.load()
        return object.verifierReports
    }

    /// Instructions the verifier processed, from the log's statistics line; nil if absent.
    public var processedInstructions: Int? {
        guard let line = log.split(separator: "\n").last(where: { $0.hasPrefix("processed ") }) else { return nil }
        return Int(line.dropFirst("processed ".count).prefix { $0.isNumber })
    }

    /// BPF_LOG_STATS: the verdict and the statistics, a few lines whatever the program's size.
    static let statisticsLevel: UInt32 = 4

    /// The log level of every load: statistics, unless REUSEPORT_VERIFIER_LOG_LEVEL asks for
    /// more (1: the instructions of each path the verifier explores, 2: with every state, plus
    /// 4 for statistics). Levels 1 and 2 make the log, and a refused load, far slower.
    static var requestedLogLevel: UInt32 {
        guard let text = getenv("REUSEPORT_VERIFIER_LOG_LEVEL").map({ String(cString: $0) }),
              let level = UInt32(text), (1...7).contains(level) else { return statisticsLevel }
        return level | statisticsLevel
    }

    /// The buffer for a log of `level`. The statistics level needs a few hundred bytes; a trace
    /// of the instructions needs megabytes (on 6.4+ a full buffer keeps the log's end).
    static func logSize(level: UInt32) -> Int {
        level & 3 == 0 ? 64 << 10 : 64 << 20
    }

    /// The lines that say why a program was refused: the last (up to 3) messages before the
    /// statistics, then the statistics line itself ("processed N insns (limit ...)") when there
    /// is one. Kernels word and split the verdict differently (7.2 puts "insns processed N" on a
    /// line of its own), so no single line is taken to be the whole of it.
    static func verdict(of log: String) -> String {
        let lines = log.split(separator: "\n").filter { !$0.allSatisfy(\.isWhitespace) }
        let statistics = lines.last { $0.hasPrefix("processed ") }
        let messages = lines.filter {
            !$0.hasPrefix("processed ") && !$0.hasPrefix("verification time") && !$0.hasPrefix("stack depth")
        }.suffix(3)
        return (messages.map(String.init) + [statistics.map { "(\($0))" }].compactMap { $0 }).joined(separator: " ")
    }

    /// Writes a refused program's log to a new file of its own under $TMPDIR (or /tmp) and
    /// returns its path; nil if it cannot be written. mkstemp: never an existing file.
    static func save(_ log: String, program: String) -> String? {
        let folder = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        var template = Array("\(folder)/reuseportd-verifier-\(program)-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { return nil }
        let file = OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
        let wrote = file.withFD { raw in
            (try? Array(log.utf8).withUnsafeBytes { try Syscall.writeAll(FileDescriptor(rawValue: raw), $0, "write(verifier log)") })
                != nil
        }
        guard wrote else { return nil }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
