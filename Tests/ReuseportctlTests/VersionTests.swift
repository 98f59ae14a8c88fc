#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// One version for both binaries, the one `make` computes for the Debian package (the git commit,
/// -dirty when the tree has changes); the daemon says which it runs in its log and in every
/// status answer, and `map dump` shows it beside reuseportctl's own.
@Suite(.onTestThreads) struct VersionTests {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    /// The version `make` wrote into .output/version.h, or nil for a build without make.
    static func madeVersion() throws -> String? {
        guard let header = try? String(contentsOfFile: "\(packageRoot)/.output/version.h", encoding: .utf8) else {
            return nil
        }
        let quoted = header.split(separator: "\"", omittingEmptySubsequences: false)
        return quoted.count >= 3 ? String(quoted[1]) : nil
    }

    static func git(_ arguments: [String]) throws -> String {
        let result = try run("/usr/bin/git", ["-C", packageRoot] + arguments)
        guard result.status == 0 else { throw HarnessError("git \(arguments): \(result)") }
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// `--version` of both: the same line; built with make, the commit checked out and -dirty
    /// exactly when a tracked file differs from it (as the Makefile computes DEB_VERSION).
    @Test func bothBinariesPrintTheVersionOfTheTree() throws {
        let ctl = try reuseportctl(["--version"])
        let daemon = try run(BuiltProducts.path("reuseportd"), ["--version"])
        #expect(ctl.status == 0, "\(ctl)")
        #expect(daemon.status == 0, "\(daemon)")
        let version = ctl.stdout.trimmingCharacters(in: .newlines)
        #expect(daemon.stdout.trimmingCharacters(in: .newlines) == version, "\(daemon)")
        #expect(version == BuildVersion.string)
        guard let made = try Self.madeVersion() else {
            #expect(version == "unknown (built without make)")
            return
        }
        #expect(version == made)
        let commit = try Self.git(["rev-parse", "--short", "HEAD"])
        let dirty = !(try Self.git(["status", "--porcelain", "--untracked-files=no"])).isEmpty
        let stale = "(if the tree changed since, run make build: it writes the version SwiftPM compiles in)"
        #expect(version.hasPrefix("0.1.0~git"), "\(version)")
        #expect(version.hasSuffix(".\(commit)" + (dirty ? "-dirty" : "")),
                "\(version) is not of commit \(commit)\(dirty ? " with changes" : "") \(stale)")
        let printed = try run("/usr/bin/make", ["-s", "-C", Self.packageRoot, "print-version"])
        #expect(printed.stdout.trimmingCharacters(in: .newlines) == version, "\(printed) \(stale)")
    }

    /// The daemon logs its version at start and sends it in `status`; `map dump` (text and
    /// --json) shows it and reuseportctl's own.
    @Test(.enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
    func theDaemonSaysWhichBuildRuns() throws {
        let daemon = try LiveDaemon(workers: 2)
        try daemon.waitUntilRunning(2)
        let status = try daemon.daemon.request(ControlRequest(command: .status))
        #expect(status.daemon?.version == BuildVersion.string, "\(String(describing: status.daemon))")
        #expect(daemon.log.contains("reuseportd \(BuildVersion.string) starting"), "\(daemon.log)")

        let text = try reuseportctl(["map", "dump"] + daemon.locations)
        #expect(text.status == 0, "\(text)")
        #expect(text.stdout.hasPrefix("daemon     pid \(daemon.pid), version \(BuildVersion.string)"
            + " (reuseportctl \(BuildVersion.string))\n"), "\(text)")

        let json = try reuseportctl(["map", "dump", "--json"] + daemon.locations)
        let dump = try #require(try decodeJSON(json.stdout) as? [String: Any])
        #expect(dump["reuseportctl_version"] as? String == BuildVersion.string, "\(json)")
        let identity = try #require(dump["daemon"] as? [String: Any], "\(json)")
        #expect(identity["version"] as? String == BuildVersion.string)
        #expect(identity["pid"] as? Int == Int(daemon.pid))
        #expect(identity["started_at_ns"] is Int)
    }
}
