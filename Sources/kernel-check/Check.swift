#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// One named kernel-feature check. `run` returns the detail printed with PASS, throws
/// `CheckFailure` (or any error) for FAIL and `CheckSkip` for SKIP.
struct Check: Sendable {
    let name: String
    /// What the check proves, for `--list`.
    let summary: String
    /// True when `--break` can make this check expect a wrong result (to show the suite fails).
    let breakable: Bool
    let run: @Sendable (CheckContext) throws -> String

    init(_ name: String, _ summary: String, breakable: Bool = false,
         run: @escaping @Sendable (CheckContext) throws -> String) {
        self.name = name
        self.summary = summary
        self.breakable = breakable
        self.run = run
    }
}

struct CheckFailure: Error, CustomStringConvertible {
    let description: String
}

struct CheckSkip: Error, CustomStringConvertible {
    let description: String
}

/// What a running check may do besides passing or failing: record measured values and
/// learn whether it was asked to expect a wrong result.
final class CheckContext: @unchecked Sendable {
    let name: String
    /// Set by `--break NAME`: the check shifts its expectation so that it must fail.
    let broken: Bool

    init(name: String, broken: Bool) {
        self.name = name
        self.broken = broken
    }

    /// Emits `VALUE <check> <key>=<value>`: a measurement the runners tabulate.
    func record(_ key: String, _ value: CustomStringConvertible) {
        Output.line("VALUE \(name) \(key)=\(value)")
    }

    func expect(_ condition: Bool, _ message: @autoclosure () -> String) throws {
        if !condition { throw CheckFailure(description: message()) }
    }

    /// Records `result` (0 or an errno) under `key` and fails unless it is `expected`.
    /// Returns the errno's name.
    @discardableResult
    func expectErrno(_ result: Int32, _ expected: Int32, key: String = "errno") throws -> String {
        let name = result == 0 ? "success" : errnoName(result)
        record(key, name)
        try expect(result == expected, "\(key): got \(name), expected \(errnoName(expected))")
        return name
    }
}

/// Result lines go straight to fd 1 with write(2): nothing sits in a stdio buffer when a
/// check crashes or the VM powers off.
enum Output {
    static func line(_ text: String) {
        try? Array((text + "\n").utf8).withUnsafeBytes { try Syscall.writeAll(.standardOutput, $0, "write(stdout)") }
    }

    static func error(_ text: String) {
        try? Array((text + "\n").utf8).withUnsafeBytes { try Syscall.writeAll(.standardError, $0, "write(stderr)") }
    }
}

/// A percentage with one decimal, as text ("48.6%").
func percent(_ part: Int, of whole: Int) -> String {
    guard whole > 0 else { return "n/a" }
    let tenths = (part * 1000 + whole / 2) / whole
    return "\(tenths / 10).\(tenths % 10)%"
}
