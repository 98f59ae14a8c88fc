#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI
import ReuseportTestSupport
import Testing
@testable import ReuseportKit

/// The program's flow records on the running kernel: the rate bound on new records, and the
/// user-space view of a record. Real sockets and packets; counters read back from the maps.
@Suite(.serialized, .enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
struct FlowRecordTests {
    /// While a change learns, 600 one-datagram flows (a source spraying new tuples) meet a bound
    /// of 100 new records per second: at most about a second's worth is recorded and the rest is
    /// counted as refused. 20 real flows that keep sending every 100 ms are all recorded within
    /// two seconds: a refused packet is retried at the flow's next one.
    @Test func aSprayOfNewTuplesCannotCrowdOutRealFlows() throws {
        let rate = 100
        var tracking = ServiceDataPlane.FlowTracking()
        tracking.recordsPerSecond = rate
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                         options: .init(seed: 0x5eed, tracking: tracking))
        try plane.beginResize(to: 4, now: MonotonicClock.nanoseconds(), learnNs: 3_600_000_000_000)
        let destination = plane.listeners[0].endpoint.address
        let target = plane.pending!.effective
        func moving(_ client: FlowClient) -> Bool {
            let flow = FlowTuple(.udp, from: client.local, to: destination)
            return target[Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: 0x5eed), count: UInt32(target.count)))]
                != plane.effectiveBuckets[Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: 0x5eed),
                                                               count: UInt32(target.count)))]
        }
        let spray = try Traffic.clients(1200, on: .loopbackV4).filter(moving)
        let real = Array(try Traffic.clients(200, on: .loopbackV4).filter(moving).prefix(20))
        try #require(spray.count > 300 && real.count == 20)

        _ = try Traffic.slotsOf(clients: spray, sending: destination, sockets: plane.listeners[0].sockets)
        let afterSpray = try plane.maps.flowCounters()
        for _ in 0..<20 {
            _ = try Traffic.slotsOf(clients: real, sending: destination, sockets: plane.listeners[0].sockets)
            usleep(100_000)
        }
        let counters = try plane.maps.flowCounters()
        let recorded = Set(try FlowRecords.read(plane.maps).map(\.flow.source))
        let cpus = Int(libbpf_num_possible_cpus())
        print("\(spray.count) sprayed flows at a bound of \(rate)/s on \(cpus) CPUs: \(afterSpray.recorded) recorded, "
            + "\(afterSpray.rate_refused) refused; then \(real.filter { recorded.contains($0.local) }.count) of 20 "
            + "real flows recorded (\(counters.rate_refused - afterSpray.rate_refused) of their packets refused first)")
        // Each CPU's bucket starts full: one second of credit, rate / CPUs records.
        #expect(afterSpray.recorded <= UInt64(rate + cpus), "the spray got at most a second's worth of records")
        #expect(afterSpray.rate_refused == UInt64(spray.count) - afterSpray.recorded, "every refusal is counted")
        #expect(real.allSatisfy { recorded.contains($0.local) }, "every real flow was recorded")
    }

    /// FlowTuple → rp_flow_key → FlowTuple, for both families: what `flows` and `which` read is
    /// the flow the program recorded.
    @Test(arguments: ["198.51.100.7:40000", "[2001:db8::7]:40000"])
    func aRecordKeyNamesItsFlow(_ source: String) throws {
        let from = try SocketAddress(parsing: source)
        let to = SocketAddress(from.address.isV4 ? IPAddress("192.0.2.1")! : IPAddress("2001:db8::1")!, 4500)
        let flow = FlowTuple(.udp, from: from, to: to)
        let key = flow.recordKey
        #expect(key.family == (from.address.isV4 ? 4 : 6) && key.protocol == UInt8(IPPROTO_UDP))
        #expect(key.ports == UInt32(40000) << 16 | 4500)
        #expect(FlowTuple(recordKey: key) == flow)
    }
}
