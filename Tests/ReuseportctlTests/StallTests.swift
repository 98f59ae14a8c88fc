#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// A slot whose worker stopped reading, as the daemon's stall check sees it and reuseportctl
/// shows it.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct StallTests {
    /// The first worker never reads its socket (it sleeps); under a flood its queue fills and the
    /// kernel drops: the slot shows `stalled` in `status`, `map dump --json` and `stats
    /// --prometheus`, with its stall counted. A reading worker (`restart`: the built-in echo)
    /// empties the queue and the slot is running again.
    @Test func aWorkerThatDoesNotReadIsStalledUntilAReaderReplacesIt() throws {
        let root = try TemporaryDirectory("stall")
        let flag = "\(root.path)/started-once"
        let script = "if [ -e \(flag) ]; then exec \(TestDaemon.builtBinary) worker echo; fi; touch \(flag); exec sleep 3600"
        let daemon = try TestDaemon(config: """
            [[service]]
            name = "stuck"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            exec = ["sh", "-c", "\(script)"]
            rcvbuf = 65536
            ready_after_ms = 100

            """, pinRoot: TestPinRoot.unique("stall"))
        let services = try daemon.waitForWorkers()
        let destination = try Endpoint(parsing: services[0].listeners[0]).address
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let payload = [UInt8](repeating: 0x55, count: 1000)

        let stalled = try floodUntil(client, destination, payload, daemon, "the slot stalled") {
            $0[0].slots[0].state == "stalled"
        }
        #expect(stalled[0].slots[0].stalls == 1)
        let dump = try reuseportctl(["map", "dump", "--json", "--pin-dir", daemon.pinRoot])
        #expect(dump.status == 0, "\(dump)")
        let slots = try #require(((try decodeJSON(dump.stdout) as? [String: Any])?["services"] as? [[String: Any]])?
            .first?["slots"] as? [[String: Any]])
        #expect(slots.first?["state"] as? String == "stalled", "\(dump.stdout)")
        let metrics = try reuseportctl(["stats", "--prometheus", "--pin-dir", daemon.pinRoot])
        #expect(metrics.stdout.contains("reuseport_slot_state{service=\"stuck\",slot=\"0\",state=\"stalled\"} 1"),
                "\(metrics)")
        #expect(metrics.stdout.contains("reuseport_slot_stalls_total{service=\"stuck\",slot=\"0\"} 1"), "\(metrics)")

        let response = try daemon.request(ControlRequest(command: .restart, service: "stuck", slot: 0))
        #expect(response.ok, "\(response)")
        // Traffic a reading worker keeps up with even on a loaded machine (2,000 datagrams a
        // second): a worker that cannot keep up with a flood is marked stalled too, rightly, since
        // its socket overflows; what this proves is that a worker that reads is not.
        let reader = try floodUntil(client, destination, payload, daemon, "the reader running", burst: 20) {
            $0[0].slots[0].state == "running" && $0[0].slots[0].pid != stalled[0].slots[0].pid
        }
        try flood(client, destination, payload, forMs: 3000, burst: 20)
        let after = try daemon.status()[0].slots[0]
        #expect(after.state == "running" && after.stalls == reader[0].slots[0].stalls, "no new stall: \(after)")
        let again = try reuseportctl(["map", "dump", "--json", "--pin-dir", daemon.pinRoot])
        #expect(again.stdout.contains("\"state\" : \"running\""), "\(again.stdout)")
        #expect(daemon.stop() == 0)
    }

    /// Sends a burst of `burst` datagrams every 10 ms (and reads what comes back) until
    /// `condition` holds for the daemon's status.
    @discardableResult
    func floodUntil(_ client: FlowClient, _ destination: SocketAddress, _ payload: [UInt8], _ daemon: TestDaemon,
                    _ what: String, timeoutMs: Int = 20_000, burst: Int = 200,
                    _ condition: ([ServiceStatus]) -> Bool) throws -> [ServiceStatus]
    {
        let deadline = nowMs() + Double(timeoutMs)
        var last: [ServiceStatus] = []
        while nowMs() < deadline {
            try flood(client, destination, payload, forMs: 10, burst: burst)
            last = try daemon.status()
            if condition(last) { return last }
        }
        throw HarnessError("timed out after \(timeoutMs) ms waiting for \(what); last: \(last); log:\n\(daemon.logTail(20))")
    }

    /// Sends `burst` datagrams every 10 ms for `ms` (reading what comes back).
    func flood(_ client: FlowClient, _ destination: SocketAddress, _ payload: [UInt8], forMs ms: Int,
               burst: Int = 200) throws {
        let deadline = nowMs() + Double(ms)
        repeat {
            for _ in 0..<burst { try client.send(payload, to: destination) }
            while (try client.receive(timeoutMs: 0)) != nil {}
            sleepMs(10)
        } while nowMs() < deadline
    }
}
