#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "pinning BPF maps and loading the program needs root"))
struct StatsTests {
    /// The exposition has HELP and TYPE for each family and one sample per slot with the
    /// counts of the datagrams sent.
    @Test func prometheusCountsEveryDatagram() throws {
        let root = PinRoot("stats-prom")
        let service = try PinnedService(root: root, name: "edge", slots: 3)
        try service.setState(1, pid: 77, state: .running, restarts: 5, since: 1)
        let clients = try Traffic.clients(30, on: .loopbackV4)
        let landed = try sendAndReceive(clients, to: service, size: 7)
        let result = try reuseportctl(["stats", "--prometheus", "--pin-dir", root.path])
        #expect(result.status == 0, "\(result)")
        let lines = Set(result.stdout.split(separator: "\n").map(String.init))
        #expect(lines.contains("# TYPE reuseport_slot_packets_total counter"))
        #expect(lines.contains { $0.hasPrefix("# HELP reuseport_slot_packets_total ") })
        // swift-prometheus writes gauges as floating point ("3.0"): compare parsed samples.
        let samples = try PrometheusSamples(result.stdout)
        for slot in 0..<UInt32(3) {
            let count = Double(landed.values.filter { $0 == slot }.count)
            #expect(samples[#"reuseport_slot_packets_total{service="edge",slot="\#(slot)"}"#] == count)
            #expect(samples[#"reuseport_slot_bytes_total{service="edge",slot="\#(slot)"}"#] == count * 7)
            #expect(samples[#"reuseport_slot_receive_drops_total{service="edge",slot="\#(slot)",listener="0"}"#] == 0)
        }
        #expect(samples[#"reuseport_slot_worker_restarts_total{service="edge",slot="1"}"#] == 5)
        #expect(samples[#"reuseport_slot_state{service="edge",slot="1",state="running"}"#] == 1)
        #expect(samples[#"reuseport_dropped_no_slot_total{service="edge"}"#] == 0)
        #expect(samples[#"reuseport_slots{service="edge"}"#] == 3)
        #expect(samples[#"reuseport_live_slots{service="edge"}"#] == 3)
    }

    /// The table's totals equal the datagrams sent; --watch redraws with rates and stops cleanly
    /// on SIGINT with status 0.
    @Test func totalsAndWatchStopOnInterrupt() throws {
        let root = PinRoot("stats-watch")
        let service = try PinnedService(root: root, name: "edge", slots: 2)
        let clients = try Traffic.clients(10, on: .loopbackV4)
        _ = try sendAndReceive(clients, to: service, size: 100)
        let plain = try reuseportctl(["stats", "--pin-dir", root.path])
        #expect(plain.status == 0, "\(plain)")
        let total = plain.stdout.split(separator: "\n").first { $0.contains("total") }
        #expect(total?.split(separator: " ").prefix(4) == ["total", "10", "1000", "B"], "\(plain)")

        let watch = try Subprocess(BuiltProducts.path("reuseportctl"), ["stats", "--watch", "0.2", "--pin-dir", root.path])
        usleep(700_000)
        try Syscall.kill(watch.pid, SIGINT)
        let status = watch.wait()
        let text = watch.text
        #expect(status == .exited(0))
        #expect(text.components(separatedBy: "Ctrl-C to stop").count >= 3, "redrew at least twice:\n\(text)")
        #expect(text.contains("PKT/S"))
    }
}
