#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// `preload_bind = true`: a server that binds its own sockets (OpenVPN, a TURN server) runs as a
/// worker with the bind preload library in `LD_PRELOAD` (preload/bind_preload.c), which turns
/// its bind() of a listener's address into the slot's inherited socket.
///
/// The library is where `make install` and the package put it, `lib/reuseportd/` beside the
/// daemon's own `bin/` folder (/usr/bin/reuseportd: /usr/lib/reuseportd/), so one build serves
/// every PREFIX; `REUSEPORTD_PRELOAD_LIBRARY` in the daemon's environment names another (the tests
/// name the one `make` built). Either is held to the rule of an `exec` program (TrustedPath): root
/// loads it into every worker.
///
/// The dynamic loader preloads nothing into two kinds of program (ld.so(8)), which are refused
/// when the configuration is read, not left to serve nothing:
/// - a statically linked one: it has no program interpreter (no `PT_INTERP` program header),
///   so no loader runs at all;
/// - a set-user-ID or set-group-ID one: where the bit takes effect the loader runs in
///   secure-execution mode (AT_SECURE) and ignores `LD_PRELOAD` paths with a slash; and a worker
///   runs with no_new_privs (WorkerExec), where the bit takes no effect: the program would run
///   without the privileges it was built to get. Either way it is not what the operator meant.
/// A script (`#!`) is checked by its interpreter, which is what the loader starts.
public enum BindPreload {
    public static let libraryVariable = "REUSEPORTD_PRELOAD_LIBRARY"
    public static let libraryName = "libreuseportd-preload.so"
    /// Relative to the folder of the daemon's binary.
    static let installedLocation = "../lib/reuseportd/\(libraryName)"

    /// The library the workers get: `REUSEPORTD_PRELOAD_LIBRARY`, else the installed one beside
    /// this binary (/proc/self/exe, so the check-config child finds the same one).
    public static func libraryPath() -> String {
        if let named = getenv(libraryVariable).map({ String(cString: $0) }), !named.isEmpty { return named }
        let executable = Syscall.executablePath() ?? "/usr/bin/reuseportd"
        let binFolder = executable[..<(executable.lastIndex(of: "/") ?? executable.startIndex)]
        let prefix = binFolder[..<(binFolder.lastIndex(of: "/") ?? binFolder.startIndex)]
        return "\(prefix)/lib/reuseportd/\(libraryName)"
    }

    /// Why the loader would not preload the library into `program`, or nil. A program that
    /// cannot be read is left to fail at its start, as any `exec` program.
    static func problem(program: String, interpreterOf script: String? = nil) -> String? {
        var info = stat()
        guard stat(program, &info) == 0 else { return nil }
        let role = script.map { "the interpreter \(program) of \($0)" } ?? "program \(program)"
        if info.st_mode & (S_ISUID | S_ISGID) != 0 {
            let bit = info.st_mode & S_ISUID != 0 ? "set-user-ID" : "set-group-ID"
            return "\(role) is \(bit) (mode \(String(info.st_mode & 0o7777, radix: 8))): where the bit takes effect "
                + "the dynamic loader ignores LD_PRELOAD (secure-execution mode, ld.so(8)), and a worker runs with "
                + "no_new_privs, where it does not: either way the program would not run as built; use a copy without the bit"
        }
        guard let head = try? Self.head(of: program) else { return nil }
        if head.starts(with: Array("#!".utf8)), script == nil {
            let line = head.dropFirst(2).prefix { $0 != 0x0a }
            let interpreter = String(decoding: line, as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\t" })
                .first.map(String.init)
            return interpreter.flatMap { problem(program: $0, interpreterOf: program) }
        }
        guard let interpreter = ELFProgramHeaders(head)?.hasInterpreter(else: { try? Syscall.readFile(program) }) else {
            return nil
        }
        if !interpreter {
            return "\(role) is statically linked (its ELF has no PT_INTERP program header): no dynamic loader runs "
                + "in it, so LD_PRELOAD cannot bring the bind preload library; use a dynamically linked build"
        }
        return nil
    }

    /// The first 64 KiB of a file: an ELF header and, in every binary seen, its program headers.
    private static func head(of path: String) throws -> [UInt8] {
        let file = try Syscall.open(path, O_RDONLY)
        var buffer = [UInt8](repeating: 0, count: 65536)
        let count = try file.withFD { try Syscall.read(FileDescriptor(rawValue: $0), into: &buffer) } ?? 0
        return Array(buffer.prefix(count))
    }
}

/// The program header table of an ELF file (elf(5)), enough to find `PT_INTERP`.
struct ELFProgramHeaders {
    static let ptInterp = 3
    let is64: Bool
    let littleEndian: Bool
    let offset: Int
    let entrySize: Int
    let count: Int

    /// Nil when `bytes` does not start with an ELF header.
    init?(_ bytes: [UInt8]) {
        guard bytes.count >= 52, bytes.starts(with: [0x7f, 0x45, 0x4c, 0x46]), [1, 2].contains(bytes[4]),
              [1, 2].contains(bytes[5]) else { return nil }
        let is64 = bytes[4] == 2, littleEndian = bytes[5] == 1
        guard !is64 || bytes.count >= 64 else { return nil }
        let field = { (at: Int, size: Int) in Self.number(bytes[at..<(at + size)], littleEndian: littleEndian) }
        let offset = is64 ? field(32, 8) : field(28, 4)
        let entrySize = is64 ? field(54, 2) : field(42, 2)
        guard entrySize >= 4, offset >= 0, offset < Int(Int32.max) else { return nil }
        self.is64 = is64
        self.littleEndian = littleEndian
        self.offset = offset
        self.entrySize = entrySize
        count = is64 ? field(56, 2) : field(44, 2)
        self.bytes = bytes
    }

    private let bytes: [UInt8]

    private static func number(_ bytes: ArraySlice<UInt8>, littleEndian: Bool) -> Int {
        (littleEndian ? bytes.reversed() : Array(bytes)).reduce(0) { $0 << 8 | Int($1) }
    }

    /// Whether a program header is `PT_INTERP`; `whole` reads the file when the table lies
    /// beyond the bytes at hand. Nil when the table cannot be read.
    func hasInterpreter(else whole: () -> [UInt8]?) -> Bool? {
        let end = offset + entrySize * count
        guard let table = end <= bytes.count ? bytes : whole(), end <= table.count else { return nil }
        return (0..<count).contains { index in
            let at = offset + index * entrySize
            return Self.number(table[at..<(at + 4)], littleEndian: littleEndian) == Self.ptInterp
        }
    }
}
