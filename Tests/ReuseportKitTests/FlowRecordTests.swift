#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI
import ReuseportTestSupport
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// The program's flow records on the running kernel: the rate bound on new records, and the
/// user-space view of a record. Real sockets and packets; counters read back from the maps.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
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

    /// The program reads bucket flags only while rp_config says a change runs
    /// (RP_CONFIG_CHANGING): a LEARN flag in a steady service records nothing, and the flag in
    /// rp_config is up from the start of a change to its end, so every flow of a learning bucket
    /// is recorded. The packets are counted per slot either way: the program ran.
    @Test(arguments: [IPAddress.loopbackV4, .loopbackV6])
    func bucketFlagsCountOnlyWhileAChangeRuns(_ family: IPAddress) throws {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(family, 0))], slotCount: 2,
                                         options: .init(bucketCount: 64, seed: 0x5eed))
        let destination = plane.listeners[0].endpoint.address
        let sockets = plane.listeners[0].sockets
        func packets() throws -> UInt64 { try plane.slots.reduce(0) { $0 + (try plane.maps.slotCounters($1).packets) } }
        let changingAtStart = try plane.maps.readChanging()
        #expect(!changingAtStart)

        // Behind the plane's back: every bucket flagged LEARN, rp_config not told.
        try plane.maps.writeBuckets(plane.effectiveBuckets.map { $0 | UInt32(RP_BUCKET_LEARN) })
        let steady = try Traffic.clients(32, on: family)
        let steered = try Traffic.slotsOf(clients: steady, sending: destination, sockets: sockets)
        let counted = try packets()
        let recordedSteady = try plane.maps.flowCounters().recorded
        #expect(steered.count == 32 && counted == 32, "steered and counted by the program")
        #expect(recordedSteady == 0, "no record without RP_CONFIG_CHANGING")
        try plane.maps.writeBuckets(plane.effectiveBuckets)

        try plane.beginResize(to: 4, now: MonotonicClock.nanoseconds(), learnNs: 3_600_000_000_000)
        #expect(try plane.maps.readChanging(), "up while the change learns")
        let moving = plane.bucketFlags.filter { $0 & UInt32(RP_BUCKET_LEARN) != 0 }.count
        try #require(moving > 0)
        let learning = try Traffic.clients(64, on: family)
        _ = try Traffic.slotsOf(clients: learning, sending: destination, sockets: plane.listeners[0].sockets)
        let recorded = try plane.maps.flowCounters().recorded
        let records = try FlowRecords.read(plane.maps).count
        #expect(recorded > 0 && recorded == UInt64(records),
                "the flows of the learning buckets are recorded")

        try plane.advance(now: MonotonicClock.nanoseconds(), force: true)
        #expect(try plane.maps.readChanging(), "up while recorded flows drain")
        // Far past the idle timeout: every record expires and the change ends.
        let result = try plane.sweep(now: MonotonicClock.nanoseconds() + 3_600_000_000_000_000)
        #expect(result.finished)
        let changingAtEnd = try plane.maps.readChanging()
        let values = try plane.maps.readBucketValues()
        #expect(!changingAtEnd, "down once no bucket carries a flag")
        #expect(values.allSatisfy { $0 & UInt32(RP_BUCKET_FLAGS) == 0 })
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
