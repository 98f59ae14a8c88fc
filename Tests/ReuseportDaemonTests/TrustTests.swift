#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// No local user steers the root daemon: through the pin root or run folder (made before the
/// daemon, or a link planted in them), through a configuration file or program someone else
/// can write, or through the daemon's own environment reaching its workers.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon runs as root, pins maps and chowns files to nobody"))
struct TrustTests {
    static let demo = """
        [[service]]
        name = "demo"
        listen = ["udp://127.0.0.1:0"]
        workers = 1
        builtin = "whoami"
        """

    /// Another tool's pins, in a folder of their own: what the attacker aims the daemon at.
    final class Victim {
        let plane: ServiceDataPlane
        let layout: PinLayout
        var directory: String { layout.serviceDirectory }

        init(_ label: String) throws {
            plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 1,
                                         options: .init(bucketCount: 8, seed: 0x5eed_1234))
            layout = PinLayout(root: TestPinRoot.path(label), service: "victim")
            try plane.pin(layout)
        }

        /// Everything the daemon could change: names, mode, owner, each pin's inode, the config's seed.
        func fingerprint() throws -> String {
            let info = try Syscall.linkStatus(directory)
            var text = "mode \(String(info.st_mode, radix: 8)) uid \(info.st_uid)"
            for name in Syscall.directoryEntries(directory).sorted() {
                text += " \(name):\(try Syscall.linkStatus("\(directory)/\(name)").st_ino)"
            }
            return text + " seed \(try DispatchMaps(pinned: layout).readConfig().seed)"
        }

        deinit {
            plane.close()
            layout.remove()
        }
    }

    /// Starts the daemon with `arguments` and waits for it to exit: nil if it is still running
    /// after `timeoutMs` (then it is stopped, and its pins removed).
    func startRefused(_ arguments: [String], pinRoot: String, log: String, timeoutMs: Int = 10_000) throws -> Int32? {
        let pid = try spawn([TestDaemon.builtBinary] + arguments, output: log)
        if let status = waitExit(pid, timeoutMs: timeoutMs) { return status }
        try? Syscall.kill(pid, SIGTERM)
        if waitExit(pid, timeoutMs: 10_000) == nil {
            try? Syscall.kill(pid, SIGKILL)
            _ = waitExit(pid, timeoutMs: 5000)
        }
        return nil
    }

    /// The measured attack: with bpffs mode 1777 `nobody` makes the pin root before root does and
    /// plants `demo -> victim` in it. The daemon must refuse to start (naming the folder, its
    /// owner and mode) and leave the victim's pins as they were. The folder is made by root and
    /// given to nobody, so that the test runs alike when bpffs is mounted 0700.
    @Test func aPinRootMadeByAnotherUserIsRefusedAndTheVictimIsUntouched() throws {
        let victim = try Victim("victim-hijack")
        let before = try victim.fingerprint()
        let pinRoot = TestPinRoot.path("hijack")
        #expect(mkdir(pinRoot, 0o755) == 0 && chown(pinRoot, TestTrust.nobody, TestTrust.nobody) == 0)
        #expect(symlink(victim.directory, "\(pinRoot)/demo") == 0)
        #expect(lchown("\(pinRoot)/demo", TestTrust.nobody, TestTrust.nobody) == 0)
        defer {
            unlink("\(pinRoot)/demo")
            rmdir(pinRoot)
        }
        let directory = try TemporaryDirectory()
        let config = try directory.write("reuseportd.toml", TrustTests.demo)
        let log = "\(directory.path)/daemon.log"
        let status = try startRefused(["--config", config, "--pin-dir", pinRoot, "--run-dir", "\(directory.path)/run"],
                                      pinRoot: pinRoot, log: log)
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(status == 2, "\(text)")
        #expect(text.contains("\(pinRoot) (owner nobody (uid 65534), mode 0755)"), "\(text)")
        #expect(try victim.fingerprint() == before, "the victim's folder and pins are as they were")
        var info = stat()
        #expect(lstat("\(pinRoot)/demo", &info) == 0 && (info.st_mode & S_IFMT) == S_IFLNK, "the link is left alone")
    }

    /// In a pin root that is root's own, a link where a service's folder belongs (left by some
    /// earlier mistake) is removed as a link; the daemon pins into a real folder of its own, and
    /// neither start nor stop touches what the link pointed at.
    @Test func aLinkInPlaceOfAServiceFolderIsRemovedNotFollowed() throws {
        let victim = try Victim("victim-link")
        let before = try victim.fingerprint()
        let pinRoot = TestPinRoot.unique("link")
        #expect(mkdir(pinRoot, 0o700) == 0)
        #expect(symlink(victim.directory, "\(pinRoot)/demo") == 0)
        let daemon = try TestDaemon(config: TrustTests.demo, pinRoot: pinRoot)
        try daemon.waitForWorkers()
        var info = stat()
        #expect(lstat("\(pinRoot)/demo", &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR, "a real folder now")
        #expect(try victim.fingerprint() == before, "start left the victim alone")
        #expect(daemon.stop() == 0, "\(daemon.logTail())")
        #expect(try victim.fingerprint() == before, "stop left the victim alone")
    }

    /// A pin root or run folder that exists with group or other write, or is a link, is refused
    /// (exit 2) with its path, owner and mode.
    @Test(arguments: ["pin 0777", "pin 0775", "run 0777", "pin link", "run link"])
    func anExistingFolderOthersCanChangeIsRefused(_ setup: String) throws {
        let directory = try TemporaryDirectory()
        let config = try directory.write("reuseportd.toml", TrustTests.demo)
        let pinRoot = TestPinRoot.unique("folder")
        let runDirectory = "\(directory.path)/run"
        let target = setup.hasPrefix("pin") ? pinRoot : runDirectory
        let real = "\(directory.path)/real"
        if setup.hasSuffix("link") {
            #expect(mkdir(real, 0o700) == 0 && symlink(real, target) == 0)
        } else {
            let mode = mode_t(setup.split(separator: " ")[1], radix: 8)!
            #expect(mkdir(target, 0o700) == 0 && chmod(target, mode) == 0)
        }
        defer {
            unlink(target)
            rmdir(target)
        }
        let log = "\(directory.path)/daemon.log"
        let status = try startRefused(["--config", config, "--pin-dir", pinRoot, "--run-dir", runDirectory],
                                      pinRoot: pinRoot, log: log)
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(status == 2, "\(text)")
        let expected = setup.hasSuffix("link")
            ? "\(target) (owner root (uid 0), mode 0777): is a symbolic link"
            : "\(target) (owner root (uid 0), mode \(setup.split(separator: " ")[1])): is writable by group or others"
        #expect(text.contains(expected), "\(text)")
    }

    // MARK: files root reads and runs

    func check(_ config: String) throws -> (status: Int32, errors: String) {
        let result = try Subprocess.run(TestDaemon.builtBinary, ["--config", config, "--check"],
                                        captureStandardError: true)
        return (result.status.shellStatus, result.errors)
    }

    /// A configuration file, or a folder above it, that anyone but root can write is refused at
    /// `--check` (and so at start, which reads it the same way), naming the path and mode.
    @Test func aConfigurationOthersCanWriteIsRefused() throws {
        let directory = try TemporaryDirectory()
        let config = try directory.write("reuseportd.toml", TrustTests.demo)
        #expect(try check(config).status == 0, "a root-owned 0644 file in a 0700 folder is fine")

        for mode in ["0666", "0620"] {
            chmod(config, mode_t(mode, radix: 8)!)
            let result = try check(config)
            #expect(result.status == 2 && result.errors.contains("\(config) (owner root (uid 0), mode \(mode)): "
                + "is writable by group or others"), "\(result)")
        }
        chmod(config, 0o644)
        chown(config, TestTrust.nobody, TestTrust.nobody)
        var result = try check(config)
        #expect(result.status == 2 && result.errors.contains("\(config) (owner nobody (uid 65534), mode 0644): "
            + "is owned by someone other than root"), "\(result)")
        chown(config, 0, 0)

        chmod(directory.path, 0o777)
        result = try check(config)
        #expect(result.status == 2 && result.errors.contains("\(directory.path) (owner root (uid 0), mode 0777): "
            + "is writable by group or others without the sticky bit"), "\(result)")
        // Sticky, as /tmp: only root (the file's owner) may rename or remove the file. Accepted (docs/configuration.md).
        chmod(directory.path, 0o1777)
        #expect(try check(config).status == 0)
        chmod(directory.path, 0o700)

        // Through a link another user owns (it could point elsewhere tomorrow).
        let link = "\(directory.path)/link.toml"
        symlink(config, link)
        lchown(link, TestTrust.nobody, TestTrust.nobody)
        result = try check(link)
        #expect(result.status == 2 && result.errors.contains("\(link) (owner nobody (uid 65534)"), "\(result)")
    }

    /// An `exec` program that anyone but root, or the worker's own user, can write is refused.
    @Test func aProgramOthersCanWriteIsRefused() throws {
        let directory = try TemporaryDirectory()
        let program = "\(directory.path)/server"
        try "#!/bin/sh\nexec sleep 60\n".write(toFile: program, atomically: false, encoding: .utf8)
        func config(user: String? = nil) throws -> String {
            try directory.write("reuseportd.toml", """
                [[service]]
                name = "prog"
                listen = ["udp://127.0.0.1:0"]
                workers = 1
                exec = ["\(program)", "--flag"]
                \(user.map { "user = \"\($0)\"" } ?? "")
                """)
        }
        chmod(program, 0o755)
        #expect(try check(try config()).status == 0)

        chmod(program, 0o777)
        var result = try check(try config())
        #expect(result.status == 2 && result.errors.contains("service[0].exec[0]: program \(program) refused: "
            + "\(program) (owner root (uid 0), mode 0777): is writable by group or others"), "\(result)")

        chmod(program, 0o755)
        let folder = "\(directory.path)/bin"
        mkdir(folder, 0o777)
        chmod(folder, 0o777)
        let inFolder = "\(folder)/server"
        try "#!/bin/sh\n".write(toFile: inFolder, atomically: false, encoding: .utf8)
        chmod(inFolder, 0o755)
        try directory.write("other.toml", """
            [[service]]
            name = "prog"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            exec = ["\(inFolder)"]
            """)
        result = try check("\(directory.path)/other.toml")
        #expect(result.status == 2 && result.errors.contains("\(folder) (owner root (uid 0), mode 0777)"), "\(result)")

        // The worker's own user may own its program: it runs as that user anyway.
        chown(program, TestTrust.nobody, TestTrust.nobody)
        #expect(try check(try config(user: "nobody")).status == 0)
        result = try check(try config())
        #expect(result.status == 2 && result.errors.contains("owner nobody (uid 65534)"), "\(result)")
    }

    /// A file named by an `exec` argument (the script an interpreter runs) is held to the rule of
    /// the program: `["/usr/bin/python3", "/tmp/x.py"]` with x.py writable by others is refused,
    /// naming exec[1], as a world-writable exec[0] is. Flags, paths that do not exist, folders
    /// and files of the worker's own user pass.
    @Test func aScriptOthersCanWriteIsRefusedAsTheProgramIs() throws {
        let directory = try TemporaryDirectory()
        let script = "\(directory.path)/x.py"
        try "print('hello')\n".write(toFile: script, atomically: false, encoding: .utf8)
        let interpreter = "\(directory.path)/python3"
        try "#!/bin/sh\nexec sleep 60\n".write(toFile: interpreter, atomically: false, encoding: .utf8)
        chmod(script, 0o644)
        chmod(interpreter, 0o755)
        func config(user: String? = nil) throws -> String {
            try directory.write("reuseportd.toml", """
                [[service]]
                name = "prog"
                listen = ["udp://127.0.0.1:0"]
                workers = 1
                exec = ["\(interpreter)", "-u", "\(script)", "/no/such/file", "\(directory.path)", "--log=\(script)"]
                \(user.map { "user = \"\($0)\"" } ?? "")
                """)
        }
        var result = try check(try config())
        #expect(result.status == 0, "\(result)")

        chmod(script, 0o666)
        result = try check(try config())
        #expect(result.status == 2 && result.errors.contains("service[0].exec[2]: file \(script) refused: "
            + "\(script) (owner root (uid 0), mode 0666): is writable by group or others"), "\(result)")

        // The program itself, as before: exec[0] is named first.
        chmod(interpreter, 0o777)
        result = try check(try config())
        #expect(result.status == 2 && result.errors.contains("service[0].exec[0]: program \(interpreter) refused: "
            + "\(interpreter) (owner root (uid 0), mode 0777): is writable by group or others"), "\(result)")
        chmod(interpreter, 0o755)

        // Another user's script: refused, unless it is the worker's own user's.
        chmod(script, 0o644)
        chown(script, TestTrust.nobody, TestTrust.nobody)
        result = try check(try config())
        #expect(result.status == 2 && result.errors.contains("service[0].exec[2]: file \(script) refused: "
            + "\(script) (owner nobody (uid 65534)"), "\(result)")
        #expect(try check(try config(user: "nobody")).status == 0)
    }

    /// A reload reads the file the same way: made world-writable, it is refused and nothing changes.
    @Test func aReloadOfAConfigurationOthersCanWriteIsRefused() throws {
        let daemon = try TestDaemon(config: TrustTests.demo)
        let running = try daemon.waitForWorkers()[0].slots.map(\.pid)
        chmod(daemon.configPath, 0o666)
        let response = try daemon.request(.init(command: .reload))
        #expect(!response.ok)
        #expect(response.error?.contains("\(daemon.configPath) (owner root (uid 0), mode 0666)") == true,
                "\(response.error ?? "")")
        #expect(try daemon.status()[0].slots.map(\.pid) == running, "the same workers serve on")
    }

    // MARK: the worker's environment

    /// Exactly the documented list (docs/configuration.md, "What a worker gets") plus the
    /// configured entries: nothing of the daemon's own environment.
    @Test(arguments: [nil, "nobody"])
    func aWorkerGetsExactlyTheDocumentedEnvironment(user: String?) throws {
        // A variable of the daemon's own environment (set for the daemon alone: setenv here would
        // reach the other tests' processes too).
        let daemon = try TestDaemon(config: """
            [[service]]
            name = "env"
            listen = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]
            workers = 1
            exec = ["/bin/sh", "-c", "env | sed 's/^/envline /'; exec sleep 60"]
            environment = ["GREETING=hello world", "PATH=/usr/bin:/bin"]
            \(user.map { "user = \"\($0)\"" } ?? "")
            """, environment: ["REUSEPORTD_TEST_LEAK": "the daemon's own"])
        let pid = try #require(try daemon.waitForWorkers()[0].slots[0].pid)
        var lines: [String] = []
        for _ in 0..<100 {
            lines = daemon.log.split(separator: "\n").compactMap { line in
                line.range(of: "envline ").map { String(line[$0.upperBound...]) }
            }
            if lines.contains(where: { $0.hasPrefix("REUSEPORT_SERVICE=") }) { break }
            sleepMs(20)
        }
        var environment: [String: String] = [:]
        for line in lines {
            let (name, value) = (line.prefix { $0 != "=" }, line.drop { $0 != "=" }.dropFirst())
            environment[String(name)] = String(value)
        }
        // dash exports PWD itself; the worker did not get it.
        environment.removeValue(forKey: "PWD")
        let account = try #require(getpwnam(user ?? "root"))
        let name = String(cString: account.pointee.pw_name)
        #expect(environment == [
            "PATH": "/usr/bin:/bin",
            "HOME": String(cString: account.pointee.pw_dir), "USER": name, "LOGNAME": name,
            "SHELL": String(cString: account.pointee.pw_shell),
            "GREETING": "hello world",
            "LISTEN_FDS": "2", "LISTEN_PID": "\(pid)", "LISTEN_FDNAMES": "listener0:listener1",
            "REUSEPORT_SLOT": "0", "REUSEPORT_SERVICE": "env", "REUSEPORT_GENERATION": "1",
            "NOTIFY_SOCKET": "\(daemon.runDirectory)/notify.sock",
        ], "\(daemon.log)")
    }
}

enum TestTrust {
    static let nobody: uid_t = 65534
}
