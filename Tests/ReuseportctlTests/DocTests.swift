#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Documentation that runs (docs/doctests.md): every command of README.md and docs/cli.md is run
/// as written, in a namespace of its own with the daemon the doc starts, and its output and exit
/// status compared with what the doc shows. A changed output fails here until the doc changes with it.
@Suite(.onTestThreads) struct DocTests {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    static let documents = ["README.md", "docs/cli.md"]

    @Test(.enabled(if: isRoot, "the docs' commands run a real daemon in namespaces of their own: needs root"),
          arguments: documents)
    func theCommandsOfADocRunAsShown(_ document: String) throws {
        let text = try String(contentsOfFile: "\(Self.packageRoot)/\(document)", encoding: .utf8)
        let steps = try DocParser.steps(text, name: document)
        let session = try DocSession(workingDirectory: Self.packageRoot)
        let matcher = DocOutputMatcher(version: BuildVersion.string)
        var ran = 0
        var skipped: [String] = []
        for step in steps {
            switch step {
            case .daemon(let arguments, let location):
                do {
                    try session.startDaemon(arguments)
                } catch {
                    Issue.record("\(location): \(error)")
                    return
                }
            case .skip(let command, let reason):
                skipped.append("\(command.location) (\(reason))")
            case .run(let command):
                ran += 1
                let result = try session.run(command.command)
                let mismatch = command.expected.flatMap { matcher.firstMismatch(expected: $0, actual: result.output) }
                if result.status != command.status || mismatch != nil {
                    var report = "\(command)\nexit status \(result.status), the doc says \(command.status)\n"
                    if let expected = command.expected {
                        report += "the doc shows (its line \((mismatch ?? 0) + 1) is the first the output does not match):\n"
                            + expected.joined(separator: "\n") + "\n"
                    }
                    report += "it printed:\n\(result.output)\ndaemon log (last lines):\n"
                        + session.daemonLog.split(separator: "\n").suffix(8).joined(separator: "\n")
                    Issue.record(Comment(rawValue: report))
                }
            }
        }
        print("doc tests: \(document): \(ran) commands run and compared, \(skipped.count) marked as not runnable"
              + (skipped.isEmpty ? "" : ": " + skipped.joined(separator: "; ")))
        #expect(ran > 0, "\(document) has no command the doc tests run")
    }

    /// Every relative link of README.md and docs/ resolves in the source tree (file and #heading),
    /// with the checker `make deb-check` runs on the installed docs.
    @Test func everyLinkInTheDocsResolves() throws {
        let result = try run("/usr/bin/python3", ["\(Self.packageRoot)/Tests/systemd-vm/check-doc-links.py", "/",
                                                  Self.packageRoot + "/docs"])
        let readme = try run("/bin/sh", ["-c", "d=$(mktemp -d) && cp '\(Self.packageRoot)/README.md' $d/ && "
                                         + "ln -s '\(Self.packageRoot)/docs' $d/docs && ln -s '\(Self.packageRoot)/dist' $d/dist && "
                                         + "python3 '\(Self.packageRoot)/Tests/systemd-vm/check-doc-links.py' / $d; s=$?; rm -rf $d; exit $s"])
        #expect(result.status == 0, "\(result)")
        #expect(readme.status == 0, "\(readme)")
    }

    // The parser and the matcher, without a daemon: that they fail where they must.

    @Test func placeholdersMatchWhatVariesAndNothingElse() {
        let matcher = DocOutputMatcher(version: "0.1.0~git20261207.abc1234")
        #expect(matcher.matches(expected: ["slot=[N] pid=[PID] peer=127.0.0.1:[PORT]", "hello"],
                                actual: "slot=3 pid=12044 peer=127.0.0.1:48502\nhello\n"))
        #expect(!matcher.matches(expected: ["slot=[N] pid=[PID]", "hello"], actual: "slot=3 pid=x\nhello\n"))
        #expect(!matcher.matches(expected: ["hello"], actual: "hello\nworld\n"), "a line left over")
        #expect(!matcher.matches(expected: ["hello", "world"], actual: "hello\n"), "a line missing")
        #expect(matcher.matches(expected: ["first", "...", "last"], actual: "first\na\nb\nlast"))
        #expect(matcher.matches(expected: ["first", "...", "last"], actual: "first\nlast"))
        #expect(!matcher.matches(expected: ["first", "...", "last"], actual: "first\na\nlast but not"))
        #expect(matcher.matches(expected: ["version [VERSION] (x)"], actual: "version 0.1.0~git20261207.abc1234 (x)"))
        #expect(!matcher.matches(expected: ["version [VERSION]"], actual: "version 0.1.0~git20261207.abc1235"))
        #expect(matcher.matches(expected: ["  SLOT  PID  IN STATE", "     0  [PID]  [TIME]"],
                                actual: "  SLOT     PID  IN STATE\n     0  123456  1m2s"))
        #expect(matcher.matches(expected: ["a [..] z"], actual: "a anything (at all) z"))
        #expect(!matcher.matches(expected: ["a [..] z"], actual: "a anything\nz"), "[..] stays within a line")
        #expect(!matcher.matches(expected: ["a.b"], actual: "axb"), "no regular expression in the doc's text")
    }

    @Test func blocksPromptsMarkersAndExitStatuses() throws {
        let doc = """
            Text.
            ```sh
            make run     # a comment
            # a comment line
            ```
            <!-- doctest: daemon --config x.toml -->
            ```
            $ reuseportctl restart 9    # exit status 2
            reuseportctl: error: no slot 9
            $ echo hi
            hi

            ```
            <!-- doctest: skip "systemctl" needs systemd -->
              ```sh
              systemctl enable --now reuseportd
              reuseportctl map dump
              ```
            ```toml
            $ not a command in a block of another language? it has a prompt: it is one
            ```
            ```
            reuseportctl map dump [--json]
            ```
            """
        let steps = try DocParser.steps(doc, name: "doc.md")
        #expect(steps == [
            .run(DocCommand(location: "doc.md:3", command: "make run     # a comment", expected: nil, status: 0)),
            .daemon(arguments: ["--config", "x.toml"], location: "doc.md:6"),
            .run(DocCommand(location: "doc.md:8", command: "reuseportctl restart 9    # exit status 2",
                            expected: ["reuseportctl: error: no slot 9"], status: 2)),
            .run(DocCommand(location: "doc.md:10", command: "echo hi", expected: ["hi"], status: 0)),
            .skip(DocCommand(location: "doc.md:16", command: "systemctl enable --now reuseportd", expected: nil, status: 0),
                  reason: "needs systemd"),
            .run(DocCommand(location: "doc.md:17", command: "reuseportctl map dump", expected: nil, status: 0)),
            .run(DocCommand(location: "doc.md:20",
                            command: "not a command in a block of another language? it has a prompt: it is one",
                            expected: [], status: 0)),
        ])
        #expect(throws: DocTestError.self) {
            try DocParser.steps("<!-- doctest: skip \"nothing\" why -->\n```sh\nls\n```\n", name: "x")
        }
        #expect(throws: DocTestError.self) { try DocParser.steps("<!-- doctest: frobnicate -->\n", name: "x") }
    }
}
