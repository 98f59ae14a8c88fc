#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Documentation that runs: the commands of a Markdown file's shell blocks, with the output the
/// file shows, read for DocTests (which run them against a real daemon and compare). The syntax a
/// doc writer uses — prompts, placeholders, the `<!-- doctest: … -->` markers — is described once,
/// in docs/doctests.md; this file implements exactly that.
public struct DocCommand: Sendable, Equatable, CustomStringConvertible {
    /// Where the command stands: `file:line`.
    public var location: String
    public var command: String
    /// The output shown (stdout and stderr as one stream), nil when the doc shows none: then only
    /// the exit status is checked.
    public var expected: [String]?
    /// `# exit status N` at the end of the command; 0 otherwise.
    public var status: Int32

    public var description: String { "\(location): $ \(command)" }

    public init(location: String, command: String, expected: [String]?, status: Int32) {
        self.location = location
        self.command = command
        self.expected = expected
        self.status = status
    }
}

public enum DocStep: Sendable, Equatable {
    /// `<!-- doctest: daemon ARGS -->`: (re)start the session's reuseportd with these arguments.
    case daemon(arguments: [String], location: String)
    case run(DocCommand)
    /// A command the doc marked as one a test cannot run, with the doc's reason.
    case skip(DocCommand, reason: String)
}

public struct DocTestError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

public enum DocParser {
    static let markerPrefix = "<!-- doctest:"
    static let shellLanguages: Set<String> = ["sh", "console", "shell", "bash"]

    /// The steps of `text` (a Markdown file called `name` in messages), in document order.
    public static func steps(_ text: String, name: String) throws -> [DocStep] {
        let lines = text.components(separatedBy: "\n")
        var steps: [DocStep] = []
        var skips: [(substring: String?, reason: String)] = []
        var index = 0
        while index < lines.count {
            let line = lines[index]
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.hasPrefix(markerPrefix) {
                guard trimmed.hasSuffix("-->") else { throw DocTestError("\(name):\(index + 1): a doctest marker ends on its line with -->") }
                let body = trimmed.dropFirst(markerPrefix.count).dropLast(3).trimmingCharacters(in: .whitespaces)
                let words = body.split(separator: " ", maxSplits: 1).map(String.init)
                switch words.first {
                case "daemon":
                    let arguments = words.count > 1 ? words[1].split(separator: " ").map(String.init) : []
                    steps.append(.daemon(arguments: arguments, location: "\(name):\(index + 1)"))
                case "skip":
                    guard words.count > 1 else { throw DocTestError("\(name):\(index + 1): skip needs a reason") }
                    var rest = words[1]
                    var substring: String?
                    if rest.hasPrefix("\""), let end = rest.dropFirst().firstIndex(of: "\"") {
                        substring = String(rest[rest.index(after: rest.startIndex)..<end])
                        rest = rest[rest.index(after: end)...].trimmingCharacters(in: .whitespaces)
                    }
                    guard !rest.isEmpty else { throw DocTestError("\(name):\(index + 1): skip needs a reason") }
                    skips.append((substring, rest))
                default:
                    throw DocTestError("\(name):\(index + 1): unknown doctest marker '\(body)' (daemon, skip: docs/doctests.md)")
                }
                index += 1
                continue
            }
            guard trimmed.hasPrefix("```") else {
                index += 1
                continue
            }
            let indent = line.prefix { $0 == " " }.count
            let fence = String(trimmed.prefix { $0 == "`" })
            let language = trimmed.dropFirst(fence.count).trimmingCharacters(in: .whitespaces)
            var body: [(number: Int, text: String)] = []
            index += 1
            while index < lines.count, lines[index].trimmingCharacters(in: .whitespaces) != fence {
                body.append((index + 1, String(lines[index].dropFirst(min(indent, lines[index].prefix { $0 == " " }.count)))))
                index += 1
            }
            index += 1
            let commands = try commandsOf(body, language: language, name: name)
            func applies(_ skip: (substring: String?, reason: String), to command: DocCommand) -> Bool {
                skip.substring.map { command.command.contains($0) } ?? true
            }
            for command in commands {
                let skip = skips.first { applies($0, to: command) }
                steps.append(skip.map { .skip(command, reason: $0.reason) } ?? .run(command))
            }
            if let unused = skips.first(where: { skip in !commands.contains { applies(skip, to: $0) } }) {
                throw DocTestError("\(name):\(body.first?.number ?? index): the skip marker above this block matches no command"
                                   + " (\(unused.substring.map { "\"\($0)\"" } ?? "the whole block"))")
            }
            skips = []
        }
        if !skips.isEmpty { throw DocTestError("\(name): a skip marker at the end is followed by no block") }
        return steps
    }

    /// A block with `$ ` prompts: each prompt a command, the lines up to the next its output. A
    /// shell block (sh, shell, bash) without prompts: each line a command whose output is not shown.
    /// Any other block (a synopsis, TOML, JSON) holds no command.
    static func commandsOf(_ body: [(number: Int, text: String)], language: String, name: String) throws -> [DocCommand] {
        let prompted = body.contains { $0.text.hasPrefix("$ ") }
        guard prompted || shellLanguages.contains(language) else { return [] }
        var commands: [DocCommand] = []
        var index = 0
        while index < body.count {
            let (number, text) = body[index]
            index += 1
            if text.trimmingCharacters(in: .whitespaces).isEmpty { continue }
            if !prompted && text.hasPrefix("#") { continue }
            guard !prompted || text.hasPrefix("$ ") else {
                throw DocTestError("\(name):\(number): output before the first $ prompt of its block")
            }
            var command = prompted ? String(text.dropFirst(2)) : text
            while command.hasSuffix("\\"), index < body.count {
                command = String(command.dropLast()) + "\n" + body[index].text
                index += 1
            }
            var status: Int32 = 0
            if let range = command.range(of: #"#\s*exit status (\d+)\s*$"#, options: .regularExpression) {
                status = Int32(command[range].filter(\.isNumber)) ?? 0
            }
            var expected: [String]? = nil
            if prompted {
                var output: [String] = []
                while index < body.count, !body[index].text.hasPrefix("$ ") {
                    output.append(body[index].text)
                    index += 1
                }
                while output.last?.trimmingCharacters(in: .whitespaces).isEmpty == true { output.removeLast() }
                expected = output
            }
            commands.append(DocCommand(location: "\(name):\(number)", command: command, expected: expected, status: status))
        }
        return commands
    }
}

/// Compares output with what a doc shows, allowing for what differs from run to run. The
/// placeholders (docs/doctests.md): `[..]` any text within a line; a line `...` any number of
/// lines, none included; `[N]`, `[PID]`, `[PORT]` a whole number; `[TIME]` a duration as
/// reuseportctl prints it (`3s`, `1m2s`); `[VERSION]` this build's version exactly. Runs of spaces
/// match runs of spaces of any length (columns widen with the numbers in them); trailing spaces
/// and blank lines at the end do not count.
public struct DocOutputMatcher: Sendable {
    public var version: String

    public init(version: String) { self.version = version }

    static let wildcards: [(String, String)] = [
        ("[..]", ".*"), ("[N]", "[0-9]+"), ("[PID]", "[0-9]+"), ("[PORT]", "[0-9]+"), ("[TIME]", "[0-9dhms]+"),
    ]

    func pattern(_ line: String) -> NSRegularExpression {
        var pattern = ""
        var rest = Substring(line.trimmingTrailingSpaces)
        var pendingSpace = false
        outer: while let character = rest.first {
            if character == " " {
                pendingSpace = true
                rest = rest.dropFirst()
                continue
            }
            if pendingSpace {
                pattern += " +"
                pendingSpace = false
            }
            for (token, regex) in Self.wildcards + [("[VERSION]", NSRegularExpression.escapedPattern(for: version))]
            where rest.hasPrefix(token) {
                pattern += regex
                rest = rest.dropFirst(token.count)
                continue outer
            }
            pattern += NSRegularExpression.escapedPattern(for: String(character))
            rest = rest.dropFirst()
        }
        // swiftlint:disable:next force_try
        return try! NSRegularExpression(pattern: "^" + pattern + "$")
    }

    /// Whether `actual` is what `expected` shows.
    public func matches(expected: [String], actual: String) -> Bool {
        firstMismatch(expected: expected, actual: actual) == nil
    }

    /// nil when they match; otherwise the index of the expected line that could not be matched
    /// (expected.count when actual has lines left over).
    public func firstMismatch(expected: [String], actual: String) -> Int? {
        var lines = actual.components(separatedBy: "\n").map(\.trimmingTrailingSpaces)
        while lines.last?.isEmpty == true { lines.removeLast() }
        let patterns = expected.map { $0.trimmingCharacters(in: .whitespaces) == "..." ? nil : pattern($0) }
        var memo: [Int: Bool] = [:]
        var furthest = 0
        func match(_ e: Int, _ a: Int) -> Bool {
            let key = e * (lines.count + 1) + a
            if let known = memo[key] { return known }
            furthest = max(furthest, e)
            let result: Bool
            if e == patterns.count {
                result = a == lines.count
            } else if let regex = patterns[e] {
                result = a < lines.count
                    && regex.firstMatch(in: lines[a], range: NSRange(lines[a].startIndex..., in: lines[a])) != nil
                    && match(e + 1, a + 1)
            } else {
                result = match(e + 1, a) || (a < lines.count && match(e, a + 1))
            }
            memo[key] = result
            return result
        }
        return match(0, 0) ? nil : furthest
    }
}

extension String {
    var trimmingTrailingSpaces: String {
        var text = Substring(self)
        while let last = text.last, last == " " || last == "\t" || last == "\r" { text = text.dropLast() }
        return String(text)
    }
}
