#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The bind preload library (preload/bind_preload.c) that `make` built: `REUSEPORT_TEST_PRELOAD`,
/// else the Makefile's default output path. The tests fail, not skip, without it.
enum PreloadLibrary {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    static func path() throws -> String {
        let path = ProcessInfo.processInfo.environment["REUSEPORT_TEST_PRELOAD"]
            ?? "\(repository)/.output/lib/reuseportd/\(BindPreload.libraryName)"
        guard access(path, R_OK) == 0 else {
            throw HarnessError("no bind preload library at \(path): run `make preload` (or set REUSEPORT_TEST_PRELOAD)")
        }
        return path
    }

    /// The daemon's environment that names it.
    static func daemonEnvironment() throws -> [String: String] { [BindPreload.libraryVariable: try path()] }
}

/// `preload_bind = true` with a server that binds its own sockets (Tests/preload/bind_server.py,
/// Python's socket module, no socket activation): its bind() of each listener's address gets the
/// slot's socket, proven by the answers (from the slot's worker, on an inherited socket) and by
/// the program's per-slot counters; a bind() elsewhere is left alone; the fd flags and options
/// the server set stay its own; a killed worker's replacement takes the same socket.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct BindPreloadTests {
    static let server = "\(PreloadLibrary.repository)/Tests/preload/bind_server.py"

    @Test func aServerThatBindsItsOwnSocketsServesTheSlotsSockets() throws {
        let port = try freePort()
        let udp = SocketAddress(.loopbackV4, port), tcp = SocketAddress(.loopbackV4, port)
        let udp6 = SocketAddress(.loopbackV6, port), elsewhere = SocketAddress(IPAddress("127.0.0.2")!, port)
        let specs = ["udp:127.0.0.1:\(port)", "tcp:127.0.0.1:\(port)", "udp:[::1]:\(port)", "udp:127.0.0.2:\(port)"]
        let daemon = try TestDaemon(
            config: serviceTable("selfbind", listen: ["udp://127.0.0.1:\(port)", "tcp://127.0.0.1:\(port)",
                                                      "udp://[::1]:\(port)"], workers: 2,
                                 program: "exec = [\"/usr/bin/python3\", \"\(Self.server)\", "
                                     + specs.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
                                 extra: "preload_bind = true"),
            environment: try PreloadLibrary.daemonEnvironment())
        let services = try daemon.waitForWorkers()
        let pids = Dictionary(uniqueKeysWithValues: services[0].slots.map { ($0.slot, $0.pid ?? 0) })
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "selfbind"))
        func counters() throws -> [UInt32: UInt64] {
            Dictionary(uniqueKeysWithValues: try (0..<UInt32(2)).map { ($0, try maps.slotCounters($0).packets) })
        }

        // UDP over IPv4: every answer from the worker of the slot it names, on its inherited
        // socket, with the server's own flags and receive buffer; each slot's counter grew by
        // exactly the datagrams its worker answered: the steering program chose every one.
        let before = try counters()
        let clients = try Traffic.clients(32, on: .loopbackV4)
        let replies = try Whoami.ask(clients, to: udp, attempts: 1, timeoutMs: 5000)
        let answered = replies.compactMap { $0 }
        try #require(answered.count == clients.count, "answers: \(replies)")
        for reply in answered {
            #expect(reply.pid == pids[reply.slot], "slot \(reply.slot)'s worker is \(pids[reply.slot] ?? 0): \(reply)")
            #expect(reply.extra["inherited"] == "yes" && reply.extra["nonblock"] == "yes"
                && reply.extra["cloexec"] == "yes", "\(reply)")
            // SO_RCVBUF 262144 set before bind(), carried over to the inherited socket (the kernel doubles it).
            #expect(reply.extra["rcvbuf"] == "524288", "\(reply)")
        }
        let after = try counters()
        var perSlot: [UInt32: UInt64] = [:]
        for reply in answered { perSlot[reply.slot, default: 0] += 1 }
        #expect(Set(perSlot.keys) == [0, 1], "both slots answered: \(perSlot)")
        for slot in UInt32(0)..<2 {
            let steered = after[slot]! - before[slot]!, served = perSlot[slot] ?? 0
            #expect(steered == served, "slot \(slot): \(steered) steered, \(served) answered")
        }

        // UDP over IPv6 and TCP: answered on inherited sockets, by the slot's worker, counted.
        let beforeOthers = try counters().values.reduce(0, +)
        let clients6 = try Traffic.clients(8, on: .loopbackV6)
        let replies6 = try Whoami.ask(clients6, to: udp6, attempts: 1, timeoutMs: 5000).compactMap { $0 }
        #expect(replies6.count == 8 && replies6.allSatisfy { $0.extra["inherited"] == "yes" && $0.pid == pids[$0.slot] },
                "IPv6: \(replies6)")
        var tcpSlots = Set<UInt32>()
        for _ in 0..<8 {
            let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
            try client.connect(to: tcp)
            try client.send(Array("ping\n".utf8), to: tcp)
            let reply = try client.receive(timeoutMs: 5000).flatMap { WhoamiReply($0) }
            #expect(reply?.extra["inherited"] == "yes" && reply?.payload == Array("ping\n".utf8)
                && reply?.pid == pids[reply?.slot ?? 9], "TCP: \(String(describing: reply))")
            if let reply { tcpSlots.insert(reply.slot) }
        }
        #expect(try counters().values.reduce(0, +) - beforeOthers == 16, "8 IPv6 datagrams and 8 connections steered")

        // 127.0.0.2 is no listener of the service: the server's own socket (a kernel reuseport
        // group of the two workers), which the steering program never sees.
        let beforeElsewhere = try counters()
        let stranger = try Traffic.clients(4, on: .loopbackV4)
        let foreign = try Whoami.ask(stranger, to: elsewhere, attempts: 1, timeoutMs: 5000).compactMap { $0 }
        #expect(foreign.count == 4 && foreign.allSatisfy { $0.extra["inherited"] == "no" }, "127.0.0.2: \(foreign)")
        #expect(try counters() == beforeElsewhere, "datagrams to an address not the service's are not steered")

        // SIGKILL slot 1's worker: its replacement binds again and takes the same socket, and the
        // same flows come back to slot 1, from the new pid.
        let onSlot1 = answered.indices.filter { answered[$0].slot == 1 }
        let killed = pids[1]!
        try Syscall.kill(killed, SIGKILL)
        let restarted = try daemon.waitFor("slot 1 restarted") {
            $0[0].slots.first { $0.slot == 1 }.map { $0.pid != nil && $0.pid != killed && $0.state == "running" } ?? false
        }
        let newPid = restarted[0].slots.first { $0.slot == 1 }!.pid!
        let again = try Whoami.ask(onSlot1.map { clients[$0] }, to: udp, attempts: 3, timeoutMs: 2000)
        #expect(again.allSatisfy { $0?.slot == 1 && $0?.pid == newPid && $0?.extra["inherited"] == "yes" },
                "slot 1's flows after the kill (new pid \(newPid)): \(again)")
        print("bind preload: \(answered.count) UDP flows over slots \(perSlot), 8 IPv6, TCP slots \(tcpSlots.sorted()), "
            + "4 to 127.0.0.2 left to the server's own socket; slot 1 killed, \(onSlot1.count) flows back on pid \(newPid)")
        #expect(daemon.stop() == 0)
    }
}

/// What the loader cannot preload into is refused when the configuration is read, naming the
/// program and why: a statically linked program and a set-user-ID one (both compiled here), and
/// a missing library. `reuseportd --check` runs the same checks as a start.
@Suite(.onTestThreads, .enabled(if: isRoot, "the refused programs are checked as root checks them (trusted paths)"))
struct BindPreloadRefusalTests {
    /// Compiles a do-nothing C program into `folder` with `flags`; returns its path.
    static func compile(_ name: String, in folder: TemporaryDirectory, flags: [String] = []) throws -> String {
        let source = try folder.write("\(name).c", "int main(void) { return 0; }\n")
        let binary = "\(folder.path)/\(name)"
        let result = try Subprocess.run("/usr/bin/cc", ["-O2"] + flags + ["-o", binary, source],
                                        captureStandardError: true)
        guard result.status.shellStatus == 0 else { throw HarnessError("cc \(flags) failed: \(result.errors)") }
        return binary
    }

    /// `reuseportd --check` of a service running `program` with `preload_bind`: exit status, stderr.
    static func check(_ program: String, in folder: TemporaryDirectory, library: String? = nil) throws
        -> (status: Int32, errors: String)
    {
        let config = try folder.write("reuseportd.toml", serviceTable(
            "refused", workers: 1, program: "exec = [\"\(program)\"]", extra: "preload_bind = true"))
        var environment = ProcessInfo.processInfo.environment
        environment[BindPreload.libraryVariable] = try library ?? PreloadLibrary.path()
        let result = try Subprocess.run(TestDaemon.builtBinary, ["--config", config, "--check"],
                                        environment: environment.map { "\($0.key)=\($0.value)" },
                                        captureStandardError: true)
        return (result.status.shellStatus, result.errors)
    }

    @Test func aStaticallyLinkedProgramIsRefused() throws {
        let folder = try TemporaryDirectory("reuseportd-preload")
        let program = try Self.compile("static-server", in: folder, flags: ["-static"])
        let (status, errors) = try Self.check(program, in: folder)
        #expect(status == 2, "\(errors)")
        #expect(errors.contains("service[0].preload_bind: program \(program) is statically linked (its ELF has no "
            + "PT_INTERP program header)"), "\(errors)")
    }

    @Test func aSetUserIDProgramIsRefused() throws {
        let folder = try TemporaryDirectory("reuseportd-preload")
        let program = try Self.compile("setuid-server", in: folder)
        #expect(chmod(program, 0o4755) == 0)
        let (status, errors) = try Self.check(program, in: folder)
        #expect(status == 2, "\(errors)")
        #expect(errors.contains("service[0].preload_bind: program \(program) is set-user-ID (mode 4755): where the bit "
            + "takes effect the dynamic loader ignores LD_PRELOAD"), "\(errors)")
    }

    @Test func aDynamicProgramPassesAndAMissingLibraryIsRefused() throws {
        let folder = try TemporaryDirectory("reuseportd-preload")
        let program = try Self.compile("server", in: folder)
        let fine = try Self.check(program, in: folder)
        #expect(fine.status == 0, "a dynamically linked program without set-ID bits: \(fine.errors)")
        let missing = "\(folder.path)/no-such-library.so"
        let (status, errors) = try Self.check(program, in: folder, library: missing)
        #expect(status == 2, "\(errors)")
        #expect(errors.contains("service[0].preload_bind: the bind preload library \(missing) refused"), "\(errors)")
    }
}

/// The worker's environment with `preload_bind`: LD_PRELOAD names the library, before any the
/// service's own `environment` names; without it, no LD_PRELOAD at all.
struct BindPreloadEnvironmentTests {
    static func service(_ extra: String) throws -> ServiceConfiguration {
        try ConfigurationParser.parse(serviceTable("e", workers: 1, program: "exec = [\"/usr/sbin/openvpn\"]",
                                                   extra: extra), file: "e.toml").services[0]
    }

    @Test func theLibraryComesFirstInLDPreload() throws {
        let library = BindPreload.libraryPath()
        let alone = WorkerEnvironment.make(try Self.service("preload_bind = true"), listeners: 1, slot: 0)
        #expect(alone.filter { $0.hasPrefix("LD_PRELOAD=") } == ["LD_PRELOAD=\(library)"])
        let both = WorkerEnvironment.make(
            try Self.service("preload_bind = true\nenvironment = [\"LD_PRELOAD=/usr/lib/other.so\"]"), listeners: 1, slot: 0)
        #expect(both.filter { $0.hasPrefix("LD_PRELOAD=") } == ["LD_PRELOAD=\(library) /usr/lib/other.so"])
        let off = WorkerEnvironment.make(try Self.service(""), listeners: 1, slot: 0)
        #expect(!off.contains { $0.hasPrefix("LD_PRELOAD=") })
    }

    /// Installed beside the binary: /usr/bin/reuseportd → /usr/lib/reuseportd/.
    @Test func theInstalledLibraryIsBesideTheBinFolder() {
        #expect(BindPreload.installedLocation == "../lib/reuseportd/libreuseportd-preload.so")
        guard getenv(BindPreload.libraryVariable) == nil, let executable = Syscall.executablePath() else { return }
        let folder = URL(fileURLWithPath: executable).deletingLastPathComponent().deletingLastPathComponent().path
        #expect(BindPreload.libraryPath() == "\(folder)/lib/reuseportd/libreuseportd-preload.so")
    }
}
