#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Least privilege (docs/operations.md, "Privileges"): the daemon works with only the
/// capabilities the documentation lists, and holds no more than those once it has started.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct PrivilegeTests {
    /// The list in docs/operations.md and dist/reuseportd.service's CapabilityBoundingSet=.
    static let documented: [(Capability, String)] = [
        (.bpf, "bpf"), (.perfmon, "perfmon"), (.netAdmin, "net_admin"), (.netBindService, "net_bind_service"),
        (.setuid, "setuid"), (.setgid, "setgid"), (.kill, "kill"), (.sysPtrace, "sys_ptrace"),
    ]
    static let documentedSet = CapabilitySet(documented.map(\.0))

    /// Started as root with every capability, the daemon lowers its effective, permitted and
    /// bounding sets to the documented ones once it has started (CAP_SYS_ADMIN among the
    /// dropped: bpffs is mounted), so a worker that stays root cannot regain more by exec.
    /// A worker with a `user` has nothing at all, ambient included.
    @Test func theDaemonDropsWhatItNoLongerNeedsAfterStartUp() throws {
        let started = try Syscall.capabilities()
        try #require(started.permitted.contains(.sysAdmin) && started.permitted.contains(.setpcap),
                     "the test runs as root with every capability")
        // In a cgroup like a unit's with Delegate=yes: where the daemon's own cgroup folder is
        // not writable by root (a container's 0555 cgroup root), it keeps CAP_DAC_OVERRIDE too.
        let cgroup = try DelegatedCgroup()
        let daemon = try TestDaemon(config: serviceTable("asuser", workers: 1, extra: "user = \"nobody\"")
            + serviceTable("asroot", workers: 1), launcher: cgroup?.launcher ?? [])
        let services = try daemon.waitForWorkers()

        let own = try ProcessCapabilitySets(daemon.pid)
        #expect(own.effective == Self.documentedSet, "CapEff \(own.effective)")
        #expect(own.permitted == Self.documentedSet, "CapPrm \(own.permitted)")
        #expect(own.bounding == Self.documentedSet, "CapBnd \(own.bounding)")
        #expect(own.ambient.isEmpty && own.inheritable.isEmpty)
        #expect(!own.effective.contains(.sysAdmin))

        let asUser = try ProcessCapabilitySets(try #require(services.first { $0.name == "asuser" }?.slots[0].pid))
        #expect(asUser.effective.isEmpty && asUser.permitted.isEmpty && asUser.ambient.isEmpty, "\(asUser)")
        // Workers gain nothing by exec (exec-worker sets no_new_privs; the unit does not).
        for service in services {
            let pid = try #require(service.slots[0].pid)
            let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            #expect(status.contains("NoNewPrivs:\t1"), "worker of \(service.name) has no_new_privs")
        }
        let asRoot = try ProcessCapabilitySets(try #require(services.first { $0.name == "asroot" }?.slots[0].pid))
        #expect(asRoot.bounding == Self.documentedSet, "a root worker: CapBnd \(asRoot.bounding)")
        #expect(!asRoot.permitted.contains(.sysAdmin), "a root worker: CapPrm \(asRoot.permitted)")
        #expect(daemon.stop() == 0)
        withExtendedLifetime(cgroup) {}
    }

    /// A daemon started with only the documented capabilities (setpriv, as systemd's
    /// CapabilityBoundingSet= does), in a cgroup of its own owned by root with mode 0755 (as
    /// systemd makes a unit's with Delegate=yes): workers start as another user in cgroups of
    /// their own, one killed from outside is restarted, a reload rebuilds the service (new
    /// program, maps and sockets) and starts new workers, and a stop is clean.
    @Test func theDocumentedCapabilitiesAreEnough() throws {
        let cgroup = try DelegatedCgroup()
        let bounding = "-all," + Self.documented.map { "+\($0.1)" }.joined(separator: ",")
        let daemon = try TestDaemon(
            config: serviceTable("least", workers: 2, extra: "user = \"nobody\"\nseed = 1"),
            launcher: (cgroup?.launcher ?? [])
                + ["/usr/bin/setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=\(bounding)", "--"])
        let before = try daemon.waitForWorkers()
        #expect(try ProcessCapabilitySets(daemon.pid).effective == Self.documentedSet)
        let destination = try udpEndpoint(before, "least")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        #expect(try Whoami.ask([client], to: destination)[0] != nil, "answered; log: \(daemon.logTail())")
        let first = try #require(before[0].slots[0].pid)
        if let cgroup {
            let own = try String(contentsOfFile: "/proc/\(first)/cgroup", encoding: .utf8)
            #expect(own.contains("\(cgroup.relative)/reuseportd-\(daemon.pid)/least.0."),
                    "the worker is in a cgroup of its own: \(own)")
        }

        try Syscall.kill(first, SIGKILL)
        try daemon.waitFor("slot 0 restarted") { $0[0].slots[0].pid != first && $0[0].slots[0].state == "running" }

        let oldPids = Set(try daemon.waitForWorkers()[0].slots.compactMap(\.pid))
        try daemon.rewriteConfig(serviceTable("least", workers: 2, extra: "user = \"nobody\"\nseed = 2"))
        let reload = try daemon.request(ControlRequest(command: .reload))
        #expect(reload.ok && (reload.message ?? "").hasPrefix("reloaded: rebuilt least"), "\(reload)")
        let after = try daemon.waitForWorkers()
        #expect(Set(after[0].slots.compactMap(\.pid)).isDisjoint(with: oldPids), "new workers")
        #expect(try Whoami.ask([client], to: destination)[0] != nil, "answered after the reload")
        let config = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "least")).readConfig()
        #expect(config.seed == 2, "the new maps are pinned")

        #expect(daemon.stop() == 0, "\(daemon.logTail())")
        #expect(PinLayout.services(under: daemon.pinRoot).isEmpty, "the pins are removed")
        withExtendedLifetime(cgroup) {}
    }

    /// A daemon started as another user with ambient capabilities (systemd's
    /// AmbientCapabilities=, here setpriv) would pass them to every worker: a change between
    /// two non-zero uids keeps the ambient set, and execve() grants it. `exec-worker` clears it
    /// before it execs the program.
    @Test func aWorkerGetsNoAmbientCapabilities() throws {
        let folder = try TemporaryDirectory()
        let output = "\(folder.path)/worker.out"
        let pid = try spawn(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", "--",
                             TestDaemon.builtBinary, "exec-worker", "--parent", String(getpid()), "--",
                             "/bin/grep", "-E", "^Cap(Amb|Prm|Eff)", "/proc/self/status"], output: output)
        #expect(waitExit(pid, timeoutMs: 10_000) == 0)
        let lines = try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 3, "\(lines)")
        for line in lines { #expect(line.hasSuffix("0000000000000000"), "the worker's \(line)") }
    }
}

/// The five capability sets of a process, from /proc/PID/status (CapInh, CapPrm, CapEff,
/// CapBnd, CapAmb, each in hex).
struct ProcessCapabilitySets: CustomStringConvertible {
    var inheritable = CapabilitySet(), permitted = CapabilitySet(), effective = CapabilitySet()
    var bounding = CapabilitySet(), ambient = CapabilitySet()

    init(_ pid: pid_t) throws {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        func set(_ field: String) throws -> CapabilitySet {
            guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("\(field):") }),
                  let bits = UInt64(line.dropFirst(field.count + 1).trimmingCharacters(in: .whitespaces), radix: 16)
            else { throw HarnessError("no \(field) in /proc/\(pid)/status") }
            return CapabilitySet(rawValue: bits)
        }
        inheritable = try set("CapInh")
        permitted = try set("CapPrm")
        effective = try set("CapEff")
        bounding = try set("CapBnd")
        ambient = try set("CapAmb")
    }

    var description: String {
        "CapEff \(effective); CapPrm \(permitted); CapInh \(inheritable); CapBnd \(bounding); CapAmb \(ambient)"
    }
}

/// A cgroup v2 folder below this process's own, mode 0755 and owned by root, as systemd makes a
/// unit's cgroup with Delegate=yes; a daemon started through `launcher` runs in it. Nil without
/// cgroup v2. Removed, with the folders the daemon left in it, at the end.
final class DelegatedCgroup {
    let path: String
    /// The path as /proc/PID/cgroup shows it ("/reuseportd-test-…").
    let relative: String

    init?() throws {
        let mountinfo = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
        guard let mount = mountinfo.split(separator: "\n").compactMap({ line -> String? in
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2, halves[1].hasPrefix("cgroup2 ") else { return nil }
            let fields = halves[0].split(separator: " ")
            return fields.count > 4 ? String(fields[4]) : nil
        }).first,
            let own = try String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8).split(separator: "\n")
                .first(where: { $0.hasPrefix("0::") }).map({ String($0.dropFirst(3)) })
        else { return nil }
        relative = (own == "/" ? "" : own) + "/reuseportd-test-\(getpid())-delegated"
        path = mount + relative
        guard mkdir(path, 0o755) == 0 else { throw HarnessError("mkdir \(path): \(String(cString: strerror(errno)))") }
    }

    /// Moves the shell into the cgroup, then execs the rest of the command line.
    var launcher: [String] { ["/bin/sh", "-c", "echo $$ > \(path)/cgroup.procs && exec \"$@\"", "sh"] }

    deinit {
        func remove(_ folder: String) {
            for child in (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [] {
                var st = stat()
                if stat("\(folder)/\(child)", &st) == 0, st.st_mode & S_IFMT == S_IFDIR { remove("\(folder)/\(child)") }
            }
            rmdir(folder)
        }
        remove(path)
    }
}
