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

/// Network namespaces of one OpenVPN run, made for it and deleted with it (even when the test
/// fails): `<prefix>s`, the servers' side (a bridge at 10.201.0.1/24 and 10.99.0.1, the address
/// every client pings through its tunnel, on lo), and `<prefix>c<i>` for each client, on a veth
/// into that bridge at 10.201.0.<10+i>. Nothing of it is in this host's own namespace. Processes
/// started in them (`start`) are killed when it goes.
final class OpenVPNNetwork {
    let prefix: String
    let clients: Int
    private var pids: [pid_t] = []

    var server: String { "\(prefix)s" }
    func client(_ index: Int) -> String { "\(prefix)c\(index)" }
    static func path(_ namespace: String) -> String { "/run/netns/\(namespace)" }

    init(_ label: String, clients: Int, folder: TemporaryDirectory) throws {
        prefix = "rp\(getpid())\(label)"
        self.clients = clients
        var script = """
            set -e
            ip netns add \(server)
            ip -n \(server) link set lo up
            ip -n \(server) addr add 10.99.0.1/32 dev lo
            ip -n \(server) link add br0 type bridge
            ip -n \(server) addr add 10.201.0.1/24 dev br0
            ip -n \(server) link set br0 up

            """
        for index in 0..<clients {
            let name = client(index)
            script += """
                ip netns add \(name)
                ip link add c\(index) netns \(server) type veth peer name eth0 netns \(name)
                ip -n \(server) link set c\(index) master br0 up
                ip -n \(name) link set lo up
                ip -n \(name) link set eth0 up
                ip -n \(name) addr add 10.201.0.\(10 + index)/24 dev eth0

                """
        }
        do {
            try Self.shell(script, log: "\(folder.path)/network.log")
        } catch {
            remove()
            throw error
        }
    }

    /// Runs `script` with /bin/sh; throws with its output when it fails.
    static func shell(_ script: String, log: String) throws {
        let pid = try spawn(["/bin/sh", "-c", script], output: log)
        guard waitExit(pid, timeoutMs: 60_000) == 0 else {
            throw HarnessError("\(script.prefix(200))… failed: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        }
    }

    /// Starts `arguments` inside `namespace` (nsenter joins only its network namespace), its
    /// output to `output`; killed with the network.
    @discardableResult
    func start(in namespace: String, _ arguments: [String], output: String, environment: [String]? = nil) throws -> pid_t {
        let pid = try spawn(["/usr/bin/nsenter", "--net=\(Self.path(namespace))"] + arguments, output: output,
                            environment: environment)
        pids.append(pid)
        return pid
    }

    /// The IPv4 address of `device` in `namespace`, nil while it has none.
    func address(of device: String, in namespace: String) -> String? {
        guard let result = try? Subprocess.run("/usr/sbin/ip", ["-n", namespace, "-4", "-o", "addr", "show", "dev", device])
        else { return nil }
        guard let inet = result.output.split(separator: " ").drop(while: { $0 != "inet" }).dropFirst().first else { return nil }
        return String(inet.split(separator: "/")[0])
    }

    private func remove() {
        for pid in pids {
            try? Syscall.kill(pid, SIGKILL)
            _ = waitExit(pid, timeoutMs: 5000)
        }
        pids = []
        // Deleting a namespace no process is in destroys it, and its veth ends with it.
        for namespace in [server] + (0..<clients).map(client) {
            _ = try? Subprocess.run("/usr/sbin/ip", ["netns", "del", namespace], captureStandardError: true)
        }
    }

    deinit { remove() }
}

/// Pings from every client through its tunnel to 10.99.0.1, 5 a second, until `stop`.
final class Pings {
    let pids: [pid_t]
    let logs: [String]

    init(_ network: OpenVPNNetwork, folder: TemporaryDirectory, round: String) throws {
        logs = (0..<network.clients).map { "\(folder.path)/ping-\(round)-\($0).log" }
        pids = try (0..<network.clients).map { index in
            try network.start(in: network.client(index), ["/usr/bin/ping", "-n", "-i", "0.2", "-W", "1", "10.99.0.1"],
                              output: "\(folder.path)/ping-\(round)-\(index).log")
        }
    }

    /// Stops them (SIGINT: ping prints its summary) and returns, per client, the pings sent and answered.
    func stop() -> (sent: [Int], answered: [Int]) {
        for pid in pids { try? Syscall.kill(pid, SIGINT) }
        var sent: [Int] = [], answered: [Int] = []
        for (pid, log) in zip(pids, logs) {
            _ = waitExit(pid, timeoutMs: 5000)
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            answered.append(text.components(separatedBy: " bytes from 10.99.0.1").count - 1)
            let summary = text.split(separator: "\n").first { $0.contains("packets transmitted") }
            sent.append(summary.flatMap { Int($0.split(separator: " ")[0]) } ?? 0)
        }
        return (sent, answered)
    }
}

/// OpenVPN from Debian (2.6), unmodified, as 4 workers behind one UDP port (`preload_bind`), each
/// with its own tun device and /24 pool from its slot (Tests/preload/openvpn/server-slot.sh), and
/// 16 real OpenVPN clients, each in a network namespace of its own, pinging 10.99.0.1 through its
/// tunnel 5 times a second. One server process gets SIGKILL: with reuseportd only that process's
/// clients reconnect (to the replacement at the same slot) and every other tunnel carries on;
/// with the kernel's own SO_REUSEPORT (each server binding the port itself, one killed and started
/// again) other clients move to a server that does not know them, and their tunnels break too.
/// Then, with reuseportd, a scale 4 → 5 and an upgrade: no tunnel breaks or moves.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "network namespaces, tun devices and the daemon's BPF program need root"))
struct BindPreloadOpenVPNTests {
    static let folder = "\(PreloadLibrary.repository)/Tests/preload/openvpn"
    static let servers = 4
    static let clients = 16
    static let killedSlot = 1
    static let port: UInt16 = 1194
    /// Every client sends from this port (each in its own namespace): a client that connects
    /// again does so from the same address and port, the same flow, as a client behind a NAT
    /// mapping that lives on would. (With `nobind` each reconnection is a new flow, which
    /// reuseportd places afresh like any new flow.)
    static let clientPort: UInt16 = 11940
    /// Pings every 200 ms; after the kill they run this long: clients restart after 4 s without
    /// an answer to OpenVPN's own pings (keepalive 1 4), then connect again.
    static let afterKillMs = 12_000

    enum Dispatch: String, CaseIterable { case reuseportd, kernel }

    /// What one run saw, per client: its slot (from its tunnel address) before the kill and at the
    /// end, how many times it connected, the pings sent and answered after it was up.
    struct Outcome {
        var slotBefore: [Int]
        var slotAfter: [Int]
        var connections: [Int]
        var sent: [Int]
        var answered: [Int]
        var reachableAtEnd: [Bool]

        var onKilled: [Int] { slotBefore.indices.filter { slotBefore[$0] == BindPreloadOpenVPNTests.killedSlot } }
        var others: [Int] { slotBefore.indices.filter { slotBefore[$0] != BindPreloadOpenVPNTests.killedSlot } }
        /// Clients that connected again: their tunnel broke.
        var broken: [Int] { connections.indices.filter { connections[$0] > 1 } }
        func lost(_ clients: [Int]) -> Int { clients.reduce(0) { $0 + sent[$1] - answered[$1] } }
        var summary: String {
            "\(onKilled.count) clients on the killed server, \(broken.count) tunnels broken "
                + "(\(broken.filter { !onKilled.contains($0) }.count) of the \(others.count) others), pings lost: "
                + "\(lost(onKilled)) by the killed server's clients, \(lost(others)) by the others "
                + "(of \(others.reduce(0) { $0 + sent[$1] }) sent); slots before \(slotBefore), after \(slotAfter)"
        }
    }

    static func writeConfigurations(_ folder: TemporaryDirectory) throws {
        try OpenVPNNetwork.shell("\(Self.folder)/pki.sh \(folder.path)", log: "\(folder.path)/pki.log")
        let dir = folder.path
        try folder.write("server.conf", """
            mode server
            tls-server
            proto udp4
            port \(port)
            dev-type tun
            topology subnet
            ca \(dir)/ca.crt
            cert \(dir)/server.crt
            key \(dir)/server.key
            dh none
            duplicate-cn
            keepalive 1 4
            disable-dco
            data-ciphers AES-128-GCM
            push "route 10.99.0.1 255.255.255.255"
            verb 3

            """)
        try folder.write("client.conf", """
            client
            dev tun
            proto udp4
            remote 10.201.0.1 \(port)
            lport \(clientPort)
            ca \(dir)/ca.crt
            cert \(dir)/client.crt
            key \(dir)/client.key
            remote-cert-tls server
            disable-dco
            data-ciphers AES-128-GCM
            connect-retry 1 1
            verb 3

            """)
    }

    static func log(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    static func connections(_ client: Int, _ folder: TemporaryDirectory) -> Int {
        log("\(folder.path)/client\(client).log").components(separatedBy: "Initialization Sequence Completed").count - 1
    }

    /// The slot of the server a client's tunnel goes to: its pool is 10.8.<slot>.0/24.
    static func slot(_ network: OpenVPNNetwork, _ client: Int) -> Int {
        network.address(of: "tun0", in: network.client(client)).flatMap { address in
            let parts = address.split(separator: ".")
            return parts.count == 4 && parts[0] == "10" && parts[1] == "8" ? Int(parts[2]) : nil
        } ?? -1
    }

    /// Waits until `condition` holds, up to `timeoutMs`; throws `what` with `detail()` if it never does.
    static func wait(_ what: String, timeoutMs: Int, _ condition: () -> Bool, detail: () -> String) throws {
        let deadline = nowMs() + Double(timeoutMs)
        while !condition() {
            if nowMs() > deadline { throw HarnessError("timed out after \(timeoutMs) ms waiting for \(what): \(detail())") }
            sleepMs(100)
        }
    }

    /// One run: servers behind the port as `dispatch` has them, the clients connected and pinging,
    /// SIGKILL to slot `killedSlot`'s server, `afterKillMs` of pings, then the count.
    static func run(_ dispatch: Dispatch) throws -> Outcome {
        let folder = try TemporaryDirectory("reuseportd-openvpn")
        try writeConfigurations(folder)
        let network = try OpenVPNNetwork(String(dispatch.rawValue.prefix(1)), clients: clients, folder: folder)
        let server = ["\(Self.folder)/server-slot.sh", "\(folder.path)/server.conf"]
        let library = try PreloadLibrary.path()
        var daemon: TestDaemon?
        var serverPids: [Int: pid_t] = [:]
        /// The kernel's way: each server binds the port itself (own-socket.py), started again by hand.
        func startOwnSocketServer(_ slot: Int) throws {
            serverPids[slot] = try network.start(
                in: network.server, ["\(Self.folder)/own-socket.py", "\(port)"] + server
                    + ["--log-append", "\(folder.path)/server\(slot).log"],
                output: "\(folder.path)/server\(slot).out",
                environment: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LD_PRELOAD=\(library)", "REUSEPORT_SLOT=\(slot)"])
        }
        switch dispatch {
        case .reuseportd:
            let started = try TestDaemon(
                config: serviceTable("openvpn", listen: ["udp://0.0.0.0:\(port)"], workers: servers,
                                     program: "exec = [" + server.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
                                     extra: "preload_bind = true\nflow_idle_timeout_ms = 1000"),
                launcher: ["/usr/bin/nsenter", "--net=\(OpenVPNNetwork.path(network.server))"] + TestDaemon.defaultLauncher,
                environment: try PreloadLibrary.daemonEnvironment())
            daemon = started
            for slot in try started.waitForWorkers()[0].slots { serverPids[Int(slot.slot)] = slot.pid }
        case .kernel:
            for slot in 0..<servers { try startOwnSocketServer(slot) }
            // Serving before the first client comes, as the daemon's are (a group that grows
            // moves flows, handshakes included).
            try wait("\(servers) servers serving", timeoutMs: 30_000, {
                (0..<servers).allSatisfy { log("\(folder.path)/server\($0).log").contains("Initialization Sequence Completed") }
            }, detail: { (0..<servers).map { log("\(folder.path)/server\($0).log").suffix(300) }.joined(separator: " | ") })
        }

        for index in 0..<clients {
            try network.start(in: network.client(index), ["/usr/sbin/openvpn", "--config", "\(folder.path)/client.conf",
                                                          "--log", "\(folder.path)/client\(index).log"],
                              output: "\(folder.path)/client\(index).out")
        }
        try wait("\(clients) clients connected", timeoutMs: 60_000, { (0..<clients).allSatisfy { connections($0, folder) == 1 } },
                 detail: { "connected: \((0..<clients).map { connections($0, folder) }); \(daemon?.logTail(10) ?? "")" })
        let slotBefore = (0..<clients).map { slot(network, $0) }
        if let daemon {
            // The steering program chose the socket of every tunnel's slot: each slot with clients counted their datagrams.
            let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "openvpn"))
            let steered = try (0..<UInt32(servers)).map { try maps.slotCounters($0).packets }
            #expect(Set(slotBefore).allSatisfy { $0 >= 0 && steered[$0] > 0 }, "per-slot datagrams \(steered), slots \(slotBefore)")
        }

        // Pings through every tunnel, 5 a second, from 2 s before the kill to afterKillMs after it.
        let pings = try Pings(network, folder: folder, round: "kill")
        sleepMs(2000)
        let killed = try #require(serverPids[killedSlot])
        try Syscall.kill(killed, SIGKILL)
        if dispatch == .kernel {
            // As a supervisor without reuseportd would: the server starts again, on a socket of its own.
            _ = waitExit(killed, timeoutMs: 5000)
            try startOwnSocketServer(killedSlot)
        }
        sleepMs(afterKillMs)
        let (sent, answered) = pings.stop()
        // Every tunnel carries pings again at the end, broken ones after their reconnection.
        try wait("every client connected again", timeoutMs: 20_000, {
            (0..<clients).allSatisfy { slot(network, $0) >= 0 }
        }, detail: { "slots: \((0..<clients).map { slot(network, $0) })" })
        let reachable = (0..<clients).map { index in
            (try? Subprocess.run("/usr/bin/nsenter", ["--net=\(OpenVPNNetwork.path(network.client(index)))",
                                                      "/usr/bin/ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "10.99.0.1"]))?
                .status.shellStatus == 0
        }
        let outcome = Outcome(slotBefore: slotBefore, slotAfter: (0..<clients).map { slot(network, $0) },
                              connections: (0..<clients).map { connections($0, folder) }, sent: sent, answered: answered,
                              reachableAtEnd: reachable)
        if let daemon {
            try changes(daemon, network, folder)
            #expect(daemon.stop() == 0)
        }
        return outcome
    }

    /// A scale 4 → 5 and an upgrade to a new generation, with every tunnel pinging throughout:
    /// no tunnel moves or breaks (flow tracking keeps each live flow on its worker; OpenVPN's
    /// keepalive keeps every tunnel live, so the old generation serves them on while they last).
    static func changes(_ daemon: TestDaemon, _ network: OpenVPNNetwork, _ folder: TemporaryDirectory) throws {
        let connectedBefore = (0..<clients).map { connections($0, folder) }
        let slotsBefore = (0..<clients).map { slot(network, $0) }
        let pings = try Pings(network, folder: folder, round: "changes")
        sleepMs(1000)
        let scale = try daemon.request(ControlRequest(command: .scale, service: "openvpn", workers: servers + 1))
        #expect(scale.ok, "\(scale)")
        try wait("the scale to switch", timeoutMs: 20_000, {
            (try? pinnedBuckets(daemon, service: "openvpn").contains(UInt32(servers))) == true
        }, detail: { daemon.logTail(5) })
        sleepMs(1000)
        let upgrade = try daemon.request(ControlRequest(command: .upgrade, service: "openvpn"))
        #expect(upgrade.ok, "\(upgrade)")
        let switched = try daemon.waitFor("the upgrade to switch", timeoutMs: 30_000) { $0[0].upgrade?.phase == .switched }
        sleepMs(2000)
        let (sent, answered) = pings.stop()
        let lost = (0..<clients).map { sent[$0] - answered[$0] }
        let connectedAfter = (0..<clients).map { connections($0, folder) }
        let oldGeneration = try daemon.status()[0].slots.filter { $0.generation == 1 }
        print("OpenVPN through scale \(servers) → \(servers + 1) and an upgrade to generation "
            + "\(switched[0].generation ?? 0): \(zip(connectedBefore, connectedAfter).filter { $0 != $1 }.count) tunnels "
            + "broken, pings lost \(lost.reduce(0, +)) of \(sent.reduce(0, +)); generation 1 still serves "
            + "\(oldGeneration.count) slots (\(oldGeneration.map(\.slot))), the new one "
            + "\(switched[0].slots.filter { $0.generation == switched[0].generation }.count)")
        #expect(connectedAfter == connectedBefore, "no client connected again: \(connectedBefore) → \(connectedAfter)")
        #expect((0..<clients).map { slot(network, $0) } == slotsBefore, "every tunnel on its slot")
        #expect(lost.allSatisfy { $0 <= 1 }, "pings lost per client: \(lost)")
        // Generation 1's slots with a tunnel serve on (the scale's new slot 4 had none, and retired at once).
        #expect(Set(slotsBefore.map(UInt32.init)).isSubset(of: Set(oldGeneration.map(\.slot))),
                "the live tunnels keep generation 1's slots: \(switched[0].slots)")
    }

    @Test(.alone) func oneServerKilledBreaksOnlyItsOwnClientsTunnels() throws {
        let managed = try Self.run(.reuseportd)
        print("OpenVPN, \(Self.clients) clients over \(Self.servers) servers, one SIGKILLed, reuseportd: \(managed.summary)")
        let kernel = try Self.run(.kernel)
        print("OpenVPN, \(Self.clients) clients over \(Self.servers) servers, one SIGKILLed, kernel SO_REUSEPORT: "
            + kernel.summary)

        for outcome in [managed, kernel] {
            #expect(!outcome.slotBefore.contains(-1), "every client had a tunnel before the kill: \(outcome.summary)")
            #expect(outcome.reachableAtEnd.allSatisfy { $0 }, "every tunnel carries pings at the end: \(outcome.summary)")
            #expect(outcome.onKilled.allSatisfy { outcome.connections[$0] > 1 },
                    "the killed server's clients connected again: \(outcome.summary)")
        }
        // reuseportd: the killed server's clients, and only they, connected again, to the same
        // slot; the others lost no ping beyond noise (one each at most).
        #expect(!managed.onKilled.isEmpty, "some client was on slot \(Self.killedSlot): \(managed.summary)")
        #expect(Set(managed.broken) == Set(managed.onKilled), "\(managed.summary)")
        #expect(managed.slotAfter == managed.slotBefore, "every client on its slot: \(managed.summary)")
        #expect(managed.others.allSatisfy { managed.sent[$0] - managed.answered[$0] <= 1 }, "\(managed.summary)")
    }
}
