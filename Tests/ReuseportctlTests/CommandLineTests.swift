#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// What needs no pins: help, argument errors, the daemon missing, the kernel probe.
@Suite(.onTestThreads) struct CommandLineTests {
    static let golden = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("golden")

    /// `--help` of the root and of each command, exactly as checked in under golden/
    /// (regenerate with `.build/debug/reuseportctl <command> --help` at COLUMNS=100).
    @Test(arguments: [[], ["map", "dump"], ["which"], ["stats"], ["flows"], ["restart"], ["scale"], ["upgrade"], ["reload"], ["features"], ["serve-metrics"], ["daemon", "reexec"]])
    func helpIsExact(command: [String]) throws {
        let result = try reuseportctl(command + ["--help"])
        #expect(result.status == 0)
        let name = command.isEmpty ? "reuseportctl" : command.joined(separator: "-")
        let expected = try String(contentsOf: Self.golden.appendingPathComponent("\(name).help.txt"), encoding: .utf8)
        #expect(result.stdout == expected)
    }

    @Test func badArgumentsExitWith2() throws {
        let unknown = try reuseportctl(["map", "dump", "--frobnicate"])
        #expect(unknown.status == 2)
        #expect(unknown.stderr.contains("--frobnicate"))
        let scale = try reuseportctl(["scale", "0"])
        #expect(scale.status == 2)
        #expect(scale.stderr.contains("N 0 is outside 1...1024 workers"), "\(scale)")
        let slot = try reuseportctl(["restart", "5000"])
        #expect(slot.status == 2)
        #expect(slot.stderr.contains("SLOT 5000 is beyond the last possible slot, 1023"), "\(slot)")
        let watch = try reuseportctl(["stats", "--watch", "--prometheus"])
        #expect(watch.status == 2)
        let canary = try reuseportctl(["upgrade", "--canary", "0"])
        #expect(canary.status == 2)
        #expect(canary.stderr.contains("--canary: give 1 to 99 percent of the buckets, not 0"), "\(canary)")
        let bake = try reuseportctl(["upgrade", "--canary", "10", "--bake", "soon"])
        #expect(bake.stderr.contains("--bake: 'soon' is not a duration: give e.g. 90s, 10m, 1h or 500ms"), "\(bake)")
        let both = try reuseportctl(["upgrade", "--promote", "--rollback"])
        #expect(both.stderr.contains("give one of --rollback, --promote, --watch, or --canary/--bake"), "\(both)")
        let watchWhat = try reuseportctl(["upgrade", "--watch", "--canary", "10"])
        #expect(watchWhat.status == 2)
        #expect(watchWhat.stderr.contains("give one of --rollback, --promote, --watch, or --canary/--bake"), "\(watchWhat)")
        let watchNoWait = try reuseportctl(["upgrade", "--watch", "--no-wait"])
        #expect(watchNoWait.status == 2)
        #expect(watchNoWait.stderr.contains("--watch waits: it takes no --no-wait"), "\(watchNoWait)")
    }

    /// No daemon: status 1 and the socket path tried.
    @Test func actionsWithoutDaemonNameTheSocket() throws {
        let runDirectory = "/tmp/reuseportctl-test-\(getpid())-nodaemon"
        for command in [["restart", "1"], ["scale", "3"], ["reload"]] {
            let result = try reuseportctl(command + ["--run-dir", runDirectory])
            #expect(result.status == 1)
            #expect(result.stderr.contains("no daemon answers at \(runDirectory)/control.sock"), "\(result)")
        }
    }

    @Test func completionScriptIsGenerated() throws {
        for shell in ["bash", "zsh", "fish"] {
            let result = try reuseportctl(["--generate-completion-script", shell])
            #expect(result.status == 0)
            #expect(result.stdout.contains("which") && result.stdout.contains("pin-dir"), "\(shell)")
        }
    }

    @Test(.enabled(if: isRoot, "the probes load BPF programs")) func featuresArePresentOnThisKernel() throws {
        let result = try reuseportctl(["features", "--json"])
        #expect(result.status == 0, "\(result)")
        let report = try #require(try decodeJSON(result.stdout) as? [String: Any])
        let features = try #require(report["features"] as? [[String: Any]])
        #expect(features.count >= 12)
        for feature in features where feature["required"] as? Bool == true {
            #expect(feature["present"] as? Bool == true, "\(feature)")
        }
    }
}

/// Without privileges the tool says so instead of blaming the kernel or the daemon.
@Suite(.onTestThreads, .enabled(if: isRoot && access("/usr/bin/setpriv", X_OK) == 0, "drops to nobody with setpriv, as root"))
struct UnprivilegedTests {
    func asNobody(_ arguments: [String]) throws -> CtlResult {
        try run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                                     BuiltProducts.path("reuseportctl")] + arguments)
    }

    /// The test pins a service of its own first, so that the folder exists whatever this
    /// machine holds: nobody is denied it (a 0700 pin folder; with bpffs mounted 0700, as
    /// systemd does, already /sys/fs/bpf), and the message must say so, not "does not exist".
    @Test func mapDumpSaysPermissionDenied() throws {
        let root = PinRoot("unprivileged-dump")
        let service = try PinnedService(root: root, slots: 1)
        _ = service
        #expect(access(root.path, F_OK) == 0, "root sees the pin folder")
        let result = try asNobody(["map", "dump", "--pin-dir", root.path])
        #expect(result.status == 1)
        #expect(result.stderr.contains("permission denied: reading the pins needs root"), "\(result)")
    }

    @Test func featuresReportPrivilegesMissingAndDoNotGuessTheRest() throws {
        let result = try asNobody(["features", "--json"])
        #expect(result.status == 1, "\(result)")
        let report = try #require(try decodeJSON(result.stdout) as? [String: Any])
        let features = try #require(report["features"] as? [[String: Any]])
        let privileges = try #require(features.first)
        #expect((privileges["name"] as? String)?.hasPrefix("privileges") == true)
        #expect(privileges["present"] as? Bool == false)
        let program = try #require(features.first { $0["name"] as? String == "BPF_PROG_TYPE_SK_REUSEPORT" })
        #expect(program["present"] is NSNull, "not probed, not reported missing: \(program)")
    }
}
