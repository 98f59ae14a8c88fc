#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The real reuseportd (ReuseportTestSupport's launcher) with its own configuration (port 0),
/// pin root and run folder, seen through reuseportctl.
final class LiveDaemon {
    let daemon: TestDaemon

    var pinRoot: String { daemon.pinRoot }
    var configPath: String { daemon.configPath }
    var pid: pid_t { daemon.pid }
    var locations: [String] { ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory] }
    var log: String { daemon.log }

    init(workers: Int, service: String = "live") throws {
        daemon = try TestDaemon(config: LiveDaemon.config(service: service, workers: workers),
                                pinRoot: TestPinRoot.unique("live"))
    }

    /// A daemon on a configuration of the test's own (one service, its listener on port 0).
    init(config: String) throws {
        daemon = try TestDaemon(config: config, pinRoot: TestPinRoot.unique("live"))
    }

    static func config(service: String, workers: Int) -> String {
        """
        [[service]]
        name = "\(service)"
        listen = ["udp://127.0.0.1:0"]
        workers = \(workers)
        builtin = "whoami"
        flow_idle_timeout_ms = 300

        """
    }

    /// Waits (BPF loads take seconds on a loaded machine) until `map dump --json` shows `workers` running slots; returns that dump's service.
    @discardableResult
    func waitUntilRunning(_ workers: Int, timeoutSeconds: Double = 30) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        var last = ""
        while Date() < deadline {
            guard daemon.checkExited() == nil else { throw HarnessError("reuseportd exited; log:\n\(log)") }
            let result = try reuseportctl(["map", "dump", "--json"] + locations)
            last = "\(result)"
            if result.status == 0, let service = try? LiveDaemon.firstService(result.stdout) {
                let slots = service["slots"] as? [[String: Any]] ?? []
                let running = slots.filter { $0["state"] as? String == "running" && $0["pid"] is Int }
                if service["slot_count"] as? Int == workers, slots.count == workers, running.count == workers {
                    return service
                }
            }
            usleep(50_000)
        }
        throw HarnessError("no \(workers) running workers after \(timeoutSeconds) s; last: \(last); log:\n\(log)")
    }

    static func firstService(_ json: String) throws -> [String: Any] {
        let dump = try #require(try decodeJSON(json) as? [String: Any])
        return try #require((dump["services"] as? [[String: Any]])?.first)
    }

    func dump() throws -> [String: Any] {
        let result = try reuseportctl(["map", "dump", "--json"] + locations)
        guard result.status == 0 else { throw HarnessError("map dump failed: \(result)") }
        return try LiveDaemon.firstService(result.stdout)
    }

    /// The service's UDP address, as `map dump` learnt it from the kernel.
    func address() throws -> SocketAddress {
        let listeners = try #require(try dump()["listeners"] as? [[String: Any]])
        let endpoint = try #require(listeners.first?["endpoint"] as? String)
        return try Endpoint(parsing: endpoint).address
    }

    /// A graceful stop; the launcher kills what is left and removes the pins.
    deinit { daemon.stop(timeoutMs: 10_000) }
}

/// Sends `payload` once from each client and returns every client's whoami reply.
func askWhoami(_ clients: [FlowClient], at address: SocketAddress, payload: [UInt8]) throws -> [WhoamiReply] {
    // One attempt only: a flow's second datagram would count twice in its slot's counters.
    let replies = try Whoami.ask(clients, to: address, attempts: 1, timeoutMs: 3000) { _ in payload }
    return try zip(clients, replies).map { client, reply in try #require(reply, "no reply to \(client.local)") }
}

/// reuseportctl against a live reuseportd: what it shows must be what the daemon and the
/// kernel do.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct LiveDaemonTests {
    /// `map dump --json` lists the daemon's slots with the pids that answer, and each slot's
    /// counters equal the datagrams it answered.
    @Test func mapDumpListsTheRightPidsAndCountsDatagrams() throws {
        let daemon = try LiveDaemon(workers: 4)
        try daemon.waitUntilRunning(4)
        let address = try daemon.address()
        let payload = [UInt8](repeating: 0x7a, count: 33)
        let clients = try Traffic.clients(120, on: .loopbackV4)
        let replies = try askWhoami(clients, at: address, payload: payload)

        let service = try daemon.dump()
        let slots = try #require(service["slots"] as? [[String: Any]])
        #expect(slots.map { $0["slot"] as? Int } == [0, 1, 2, 3])
        for entry in slots {
            let slot = try #require(entry["slot"] as? Int)
            let answered = replies.filter { Int($0.slot) == slot }
            #expect(!answered.isEmpty, "120 flows reach every one of 4 slots")
            #expect(Set(answered.map { Int($0.pid) }) == [entry["pid"] as? Int ?? -1], "slot \(slot)")
            #expect(entry["state"] as? String == "running")
            #expect(entry["packets"] as? Int == answered.count, "slot \(slot)")
            #expect(entry["bytes"] as? Int == answered.count * payload.count, "slot \(slot)")
            #expect(entry["receive_drops"] as? Int == 0)
            #expect(entry["buckets"] as? Int == 1024)
        }
    }

    /// `which` names the slot and pid the whoami worker reports, for 200 client ports.
    @Test func whichAgreesWithWhoamiFor200ClientPorts() throws {
        let daemon = try LiveDaemon(workers: 5)
        try daemon.waitUntilRunning(5)
        let address = try daemon.address()
        let clients = try Traffic.clients(200, on: .loopbackV4)
        let replies = try askWhoami(clients, at: address, payload: Array("which".utf8))
        let result = try reuseportctl(["which", "--json"] + daemon.locations + clients.map { "\($0.local)" })
        #expect(result.status == 0, "\(result)")
        let answers = try #require(try decodeJSON(result.stdout) as? [[String: Any]])
        #expect(answers.count == 200)
        for (index, answer) in answers.enumerated() {
            #expect(answer["slot"] as? Int == Int(replies[index].slot), "\(clients[index].local)")
            #expect(answer["pid"] as? Int == Int(replies[index].pid), "\(clients[index].local)")
        }
        #expect(Set(replies.map(\.slot)).count == 5)
    }

    /// `restart` gives the slot a new worker and `scale` changes the slots, and the next
    /// `map dump` shows both; `reload` applies a changed file.
    @Test func restartScaleAndReloadChangeWhatMapDumpShows() throws {
        let daemon = try LiveDaemon(workers: 4)
        let before = try daemon.waitUntilRunning(4)
        let slotsBefore = try #require(before["slots"] as? [[String: Any]])
        let oldPid = try #require(slotsBefore[1]["pid"] as? Int)
        let oldRestarts = try #require(slotsBefore[1]["restarts"] as? Int)

        let restart = try reuseportctl(["restart", "1"] + daemon.locations)
        #expect(restart.status == 0, "\(restart)")
        let afterRestart = try #require(try daemon.dump()["slots"] as? [[String: Any]])
        #expect(afterRestart[1]["pid"] as? Int != oldPid)
        #expect(afterRestart[1]["pid"] is Int)
        #expect(afterRestart[1]["state"] as? String == "running")
        #expect(afterRestart[1]["restarts"] as? Int == oldRestarts + 1)
        for slot in [0, 2, 3] { #expect(afterRestart[slot]["pid"] as? Int == slotsBefore[slot]["pid"] as? Int) }
        #expect(restart.stdout.contains("slot 1 of live: worker \(oldPid) -> "), "\(restart)")

        let up = try reuseportctl(["scale", "6", "--now"] + daemon.locations)
        #expect(up.status == 0, "\(up)")
        #expect(up.stdout.contains("1364 of 4096 buckets moved"), "\(up)")
        let six = try daemon.dump()
        #expect(six["slot_count"] as? Int == 6)
        let sixSlots = try #require(six["slots"] as? [[String: Any]])
        #expect(sixSlots.map { $0["slot"] as? Int } == [0, 1, 2, 3, 4, 5])
        #expect(sixSlots.allSatisfy { $0["pid"] is Int && $0["state"] as? String == "running" })
        #expect(sixSlots.map { $0["buckets"] as? Int ?? 0 }.reduce(0, +) == 4096)

        let down = try reuseportctl(["scale", "2", "--now"] + daemon.locations)
        #expect(down.status == 0, "\(down)")
        let two = try daemon.dump()
        #expect(two["slot_count"] as? Int == 2)
        let twoSlots = try #require(two["slots"] as? [[String: Any]])
        #expect(twoSlots.map { $0["slot"] as? Int } == [0, 1])
        #expect(twoSlots.map { $0["buckets"] as? Int } == [2048, 2048])

        try LiveDaemon.config(service: "live", workers: 3).write(toFile: daemon.configPath, atomically: true,
                                                                 encoding: .utf8)
        let reload = try reuseportctl(["reload"] + daemon.locations)
        #expect(reload.status == 0, "\(reload)")
        try daemon.waitUntilRunning(3)
    }

    /// A wedged daemon (SIGSTOP): read-only commands still work; actions time out with a
    /// message that says so. Unknown services are named with the ones that exist.
    @Test func wedgedDaemonAndUnknownService() throws {
        let daemon = try LiveDaemon(workers: 2)
        try daemon.waitUntilRunning(2)
        let unknown = try reuseportctl(["restart", "0", "--service", "nope"] + daemon.locations)
        #expect(unknown.status == 1)
        #expect(unknown.stderr.contains("runs no service 'nope'; it runs: live"), "\(unknown)")

        kill(daemon.pid, SIGSTOP)
        defer { kill(daemon.pid, SIGCONT) }
        let dump = try reuseportctl(["map", "dump"] + daemon.locations)
        #expect(dump.status == 0, "\(dump)")
        #expect(dump.stdout.contains("running"))
        let restart = try reuseportctl(["restart", "0", "--timeout", "1"] + daemon.locations)
        #expect(restart.status == 1)
        #expect(restart.stderr.contains("did not answer within 1 s"), "\(restart)")
    }
}
