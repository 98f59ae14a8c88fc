#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The example workers of docs/examples (Python, C and Go; installed under /usr/share/doc/reuseportd/examples), run
/// as the daemon runs them: a UDP and a TCP listener, `notify`, `watchdog_ms` and `drain_signal`.
/// Each says READY=1 and STATUS=, keeps its watchdog, answers datagrams and connections on the
/// sockets it was given, and, when a scale-down takes its slot, serves its open connection to the
/// end and exits by itself.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ExampleWorkerTests {
    static let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("docs/examples").path

    enum Language: String, CaseIterable { case python, c, go }

    /// The `exec` array for the example in `language` (the C and Go ones compiled into `folder` first;
    /// Go with Debian's golang-go, which the Makefile installs, its build cache in the build folder).
    static func program(_ language: Language, in folder: TemporaryDirectory) throws -> [String] {
        let binary = "\(folder.path)/worker"
        let compile: [String]
        var environment: [String]? = nil
        switch language {
        case .python:
            return ["/usr/bin/python3", "\(examples)/worker.py"]
        case .c:
            compile = ["/usr/bin/cc", "-O2", "-Wall", "-Werror", "-o", binary, "\(examples)/worker.c"]
        case .go:
            compile = ["/usr/bin/go", "build", "-o", binary, "\(examples)/worker.go"]
            let cache = URL(fileURLWithPath: examples).deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent(".output/gocache").path
            environment = ProcessInfo.processInfo.environment.merging(
                ["CGO_ENABLED": "0", "GOCACHE": cache, "HOME": folder.path, "GOFLAGS": ""]) { $1 }.map { "\($0.key)=\($0.value)" }
        }
        let compiler = try spawn(compile, output: "\(folder.path)/build.log", environment: environment)
        guard waitExit(compiler, timeoutMs: 120_000) == 0 else {
            throw HarnessError("\(compile.joined(separator: " ")) failed: "
                + ((try? String(contentsOfFile: "\(folder.path)/build.log", encoding: .utf8)) ?? ""))
        }
        return [binary]
    }

    @Test(arguments: Language.allCases)
    func anExampleWorkerServesNotifiesAndDrains(_ language: Language) throws {
        let folder = try TemporaryDirectory("reuseportd-example")
        let argv = try Self.program(language, in: folder)
        let daemon = try TestDaemon(config: serviceTable(
            "example", listen: ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], workers: 2,
            program: "exec = [" + argv.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
            extra: "notify = true\nwatchdog_ms = 1000\ndrain_signal = \"SIGUSR2\"\nflow_idle_timeout_ms = 500"))
        let services = try daemon.waitFor("both workers ready by READY=1") { services in
            services[0].slots.allSatisfy { $0.state == "running" && $0.notifiedReady == true }
        }
        let listeners = services[0].listeners.compactMap { try? Endpoint(parsing: $0) }
        let udp = try #require(listeners.first { $0.transport == .udp }).address
        let tcp = try #require(listeners.first { $0.transport == .tcp }).address
        #expect(services[0].slots.allSatisfy { $0.notifiedStatus == "serving 2 sockets" }, "\(services[0].slots)")

        // UDP: every datagram answered, by the slot the status names.
        let clients = try Traffic.clients(32, on: .loopbackV4)
        var slotsSeen = Set<String>()
        for (index, client) in clients.enumerated() {
            try client.send(Array("hello \(index)".utf8), to: udp)
            let answer = try client.receive(timeoutMs: 5000).map { String(decoding: $0, as: UTF8.self) }
            #expect(answer?.hasSuffix(" generation=1 hello \(index)") == true, "datagram \(index): \(answer ?? "no answer")")
            if let slot = answer?.split(separator: " ").first { slotsSeen.insert(String(slot)) }
        }
        #expect(slotsSeen == ["slot=0", "slot=1"], "both slots answered: \(slotsSeen)")

        // TCP: a connection to slot 1's worker, held through a scale-down that takes slot 1.
        var held: FlowClient?
        for _ in 0..<64 where held == nil {
            let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
            try client.connect(to: tcp)
            try client.send(Array("ping\n".utf8), to: tcp)
            let answer = try client.receive(timeoutMs: 5000).map { String(decoding: $0, as: UTF8.self) }
            #expect(answer?.hasSuffix(" generation=1 ping\n") == true, "TCP answer: \(answer ?? "none")")
            if answer?.hasPrefix("slot=1 ") == true { held = client }
        }
        try #require(held != nil, "no connection reached slot 1 in 64 tries")

        // The watchdog: more than twice watchdog_ms pass, and no worker is restarted for it.
        sleepMs(2500)
        let alive = try daemon.status()[0].slots
        #expect(alive.allSatisfy { ($0.watchdogRestarts ?? 0) == 0 && $0.restarts == 0 }, "\(alive)")
        let leavingPid = try #require(alive.first { $0.slot == 1 }?.pid)

        let scale = try daemon.request(ControlRequest(command: .scale, service: "example", workers: 1))
        #expect(scale.ok, "\(scale)")
        let holding = try daemon.waitFor("slot 1 retired, its worker holding its connection", timeoutMs: 20_000) {
            $0[0].slots.map(\.slot) == [0] && ($0[0].leaving ?? []).contains { $0.pid == leavingPid && $0.state == .holding }
        }
        try held!.send(Array("still there?\n".utf8), to: tcp)
        let late = try held!.receive(timeoutMs: 5000).map { String(decoding: $0, as: UTF8.self) }
        #expect(late == "slot=1 generation=1 still there?\n", "the held connection is served by its worker: \(late ?? "none")")
        // Closed by the client: the draining worker has nothing left and exits by itself, long
        // before drain_timeout_ms (an hour).
        held = nil  // its only reference: the socket closes
        let gone = nowMs() + 10_000
        while processExists(leavingPid), nowMs() < gone { sleepMs(50) }
        print("example worker (\(language.rawValue)): slots \(slotsSeen.sorted()), leaving \(holding[0].leaving ?? []), "
            + "exited by itself: \(!processExists(leavingPid))")
        #expect(!processExists(leavingPid), "the drained worker exited once its last connection closed")
        #expect(daemon.stop() == 0)
    }

    /// Each example through what operations do to it: a worker killed (SIGKILL) is replaced on its
    /// slot and its flows are answered there again; a rescale (2 -> 3) gives the new slot flows; an
    /// upgrade's new generation answers new flows (`generation=2`). Every datagram is answered.
    @Test(arguments: Language.allCases)
    func anExampleWorkerSurvivesAKillARescaleAndAnUpgrade(_ language: Language) throws {
        let folder = try TemporaryDirectory("reuseportd-example")
        let argv = try Self.program(language, in: folder)
        let daemon = try TestDaemon(config: serviceTable(
            "example", listen: ["udp://127.0.0.1:0"], workers: 2,
            program: "exec = [" + argv.map { "\"\($0)\"" }.joined(separator: ", ") + "]",
            extra: "notify = true\nwatchdog_ms = 1000\nflow_idle_timeout_ms = 500"))
        func ready(_ services: [ServiceStatus], _ count: Int) -> Bool {
            services[0].slots.count == count && services[0].slots.allSatisfy { $0.state == "running" && $0.notifiedReady == true }
        }
        let services = try daemon.waitFor("both workers ready by READY=1") { ready($0, 2) }
        let udp = try #require(services[0].listeners.compactMap { try? Endpoint(parsing: $0) }.first).address

        /// Each client's answer: its slot and generation ("slot=1 generation=1").
        func ask(_ clients: [FlowClient], _ what: String) throws -> [String] {
            try clients.enumerated().map { index, client in
                try client.send(Array("\(what) \(index)".utf8), to: udp)
                let answer = try client.receive(timeoutMs: 5000).map { String(decoding: $0, as: UTF8.self) }
                #expect(answer?.hasSuffix(" \(what) \(index)") == true, "\(what) \(index): \(answer ?? "no answer")")
                return answer?.split(separator: " ").prefix(2).joined(separator: " ") ?? "none"
            }
        }
        let clients = try Traffic.clients(32, on: .loopbackV4)
        let before = try ask(clients, "before")

        // SIGKILL: a new worker on the same slot; every flow answered by the slot it had.
        let killed = try #require(services[0].slots.first { $0.slot == 0 }?.pid)
        try Syscall.kill(killed, SIGKILL)
        try daemon.waitFor("slot 0 has a new worker, ready") { services in
            ready(services, 2) && services[0].slots.first { $0.slot == 0 }?.pid != killed
        }
        let afterKill = try ask(clients, "after a kill")
        #expect(afterKill == before, "no flow changed slot through the kill")

        // A rescale: the new slot's worker gets flows once the change switched.
        let scale = try daemon.request(ControlRequest(command: .scale, service: "example", workers: 3))
        #expect(scale.ok, "\(scale)")
        try daemon.waitFor("3 workers ready", timeoutMs: 20_000) { ready($0, 3) }
        sleepMs(1500)  // the change learns for flow_idle_timeout_ms, then switches
        let fresh = try Traffic.clients(48, on: .loopbackV4)
        let rescaled = try ask(fresh, "after a rescale")
        #expect(Set(rescaled) == ["slot=0 generation=1", "slot=1 generation=1", "slot=2 generation=1"], "\(Set(rescaled))")

        // An upgrade: generation 2 answers new flows once it switched.
        let upgrade = try daemon.request(ControlRequest(command: .upgrade, service: "example"))
        #expect(upgrade.ok, "\(upgrade)")
        try daemon.waitFor("generation 2 switched", timeoutMs: 30_000) {
            $0[0].generation == 2 && $0[0].upgrade?.phase == .switched
        }
        let upgraded = try ask(try Traffic.clients(16, on: .loopbackV4), "after an upgrade")
        #expect(upgraded.allSatisfy { $0.hasSuffix(" generation=2") }, "\(upgraded)")
        print("example worker (\(language.rawValue)): through a SIGKILL \(afterKill == before ? "no flow moved" : "flows moved"), "
              + "after the rescale \(Set(rescaled).sorted()), after the upgrade \(Set(upgraded).sorted())")
        #expect(daemon.stop() == 0)
    }
}
