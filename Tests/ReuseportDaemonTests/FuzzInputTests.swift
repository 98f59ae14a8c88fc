import Foundation
import ReuseportControl
import ReuseportDaemon
import Testing

/// The inputs `make fuzz` starts from and the ones it found crashing (Tests/fuzz, docs/fuzzing.md),
/// fed to the same entry points: each ends in a value or a clean error, never a trap. In process,
/// no root needed.
struct FuzzInputTests {
    static let fuzzDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("fuzz")

    /// The seeds and the regressions of one fuzz target (`config` or `control`).
    static func inputs(_ target: String) -> [String] {
        ["corpus", "regressions"].flatMap { folder -> [String] in
            let path = fuzzDirectory.appendingPathComponent(folder).appendingPathComponent(target).path
            let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
            return names.filter { !$0.hasPrefix(".") }.sorted().map { "\(folder)/\(target)/\($0)" }
        }
    }

    static func text(_ input: String) throws -> Data {
        try Data(contentsOf: fuzzDirectory.appendingPathComponent(input))
    }

    @Test(arguments: inputs("config"))
    func configurationInput(_ input: String) throws {
        let text = String(decoding: try Self.text(input), as: UTF8.self)
        do throws(ConfigurationError) {
            _ = try ConfigurationParser.parse(text, file: input)
        } catch {
            #expect(error.file == input)
        }
    }

    @Test(arguments: inputs("control"))
    func controlInput(_ input: String) throws {
        let line = try Self.text(input).prefix { $0 != 0x0a }
        do throws(ControlRequestError) {
            let request = try ControlFraming.decodeRequest(line)
            let services = [ControlTarget(name: "demo", slots: [0, 1], bucketCount: 8)]
            _ = try? ControlAction(checking: request, against: services)
        } catch {
            #expect(error.description.hasPrefix("bad request: "))
        }
    }

    /// toml++ recurses once per level of a dotted key and has no limit for them: 40 000 levels
    /// overflowed the stack (SIGSEGV in `parser::update_region_ends`). Found by reading for
    /// recursion, not by the fuzzer, whose inputs are shorter (-max_len).
    @Test(arguments: ["dotted-key-40000-deep.toml", "table-header-40000-deep.toml"])
    func deeplyDottedKeysAreRefused(_ name: String) throws {
        let text = String(decoding: try Self.text("regressions/config/\(name)"), as: UTF8.self)
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(text, file: name) }
        #expect(error?.line == 1)
        #expect(error?.description == "\(name): line 1 has more than 64 dots outside strings: keys nested that deep "
            + "(a.b.c...) would overflow the TOML parser's stack")
    }

    /// toml++ asserts what it has not checked (SIGABRT in a debug build, undefined behaviour
    /// under NDEBUG), and `make fuzz` found four: a table header whose name starts with
    /// neither a letter, digit, '-', '_' nor a quote (`parser::parse_key`): `[[\urvice]]`, and
    /// after a byte-order mark `[` and an invalid UTF-8 byte (read as U+FFFD), as `[[` alone;
    /// an array whose value after ',' is a '}' (`parser::parse_value`); a date-time without
    /// the digits of its time (`parser::parse_time`).
    @Test(arguments: [
        ("table-header-starting-with-backslash.toml", 2, "a table header needs a name after '[' or '[[' "
            + "(letters, digits, '-', '_' or a quoted name)"),
        ("byte-order-mark-then-header-of-invalid-utf8.toml", 1, "a table header needs a name"),
        ("table-header-without-name.toml", 1, "a table header needs a name"),
        ("array-closed-by-brace-after-comma.toml", 1, "'}' where an array needs a value or ']'"),
        ("date-time-without-its-time.toml", 4, "'1979-05-27T;;;;;;;;;;;;;;;;;;;;;;;;;;;;;' is no value a configuration "
            + "takes (no key takes a date or a time)"),
    ])
    func whatTheTOMLParserAssertsIsRefused(_ name: String, line: Int, problem: String) throws {
        let text = String(decoding: try Self.text("regressions/config/\(name)"), as: UTF8.self)
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(text, file: name) }
        #expect(error?.line == line)
        #expect(error?.description.hasPrefix("\(name): line \(line): \(problem)") == true,
                "\(String(describing: error))")
    }

    /// A '[' that opens a nested array is no table header, even at the start of a line.
    @Test func bracketsInArraysAreNotHeaders() {
        let text = "[[service]]\nname = \"s\"\nlisten = [\n[\n\"x\"]]\n"
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(text, file: "t.toml") }
        #expect(error?.description == "t.toml: service[0].listen[0]: must be a string, not array")
    }

    /// Dots in strings and comments are not keys: only those outside count.
    @Test func dotsInStringsAndCommentsAreNotCounted() throws {
        let dots = String(repeating: ".", count: 100)
        let text = #"""
            # DOTS
            [[service]] # DOTS
            name = "s"
            listen = ["udp://127.0.0.1:0"] # "DOTS
            workers = 1
            exec = ["/bin/DOTS", 'DOTS', """
            DOTS\
            DOTS"""", '''DOTS
            DOTS''', "\"DOTS"]
            """#.replacingOccurrences(of: "DOTS", with: dots)
        let configuration = try ConfigurationParser.parse(text, file: "dots.toml")
        #expect(configuration.services[0].program == .exec([
            "/bin/\(dots)", dots, "\(dots)\(dots)\"", "\(dots)\n\(dots)", "\"\(dots)",
        ]))
        #expect(throws: Never.self) {
            try ConfigurationParser.parse("[[service]]\nname = 'n-1'\nlisten = ['udp://127.0.0.1:0']\nworkers = +1\n"
                + "seed = -0\nbuiltin = \"echo\"\n", file: "signs.toml")
        }
        let deep = "[[service]]\nname = \"s\"\n" + Array(repeating: "a", count: 66).joined(separator: ".") + " = 1\n"
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(deep, file: "t.toml") }
        #expect(error?.line == 3)
    }

    @Test func theSeedCorporaAreThere() {
        #expect(Self.inputs("config").count >= 5 && Self.inputs("control").count >= 5)
    }
}
