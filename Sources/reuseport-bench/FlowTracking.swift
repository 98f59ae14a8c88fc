#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import SystemPackage
import ReuseportKit

/// Item 7: what flow tracking costs. BPF run-time statistics, variants interleaved and paired
/// by repeat, as item 2:
/// - steady state: rp_dispatch against the same program built without flow tracking
///   (RP_NO_FLOW_TRACKING), on the same sockets and tables;
/// - during a change: the same flows once their buckets are pinned and each has a record, in
///   tables of 64k, 1M and 10M records, against the same flows on a service in steady state;
///   and what the kernel charges for the records.
struct FlowTrackingBench {
    /// Paired ns per run, by repeat.
    var tracked: [Double] = []
    var untracked: [Double] = []

    struct Table {
        var records: Int
        /// ns per run of a packet whose bucket is pinned and whose flow has a record.
        var pinned: [Double] = []
        /// The same flows on a service in steady state, paired.
        var steady: [Double] = []
        /// The pinned packets again with the build that leaves the record as it is (no clock
        /// read, no write: RP_BENCH_NO_REFRESH), on the same sockets and tables, paired.
        var unrefreshed: [Double] = []
        /// rp_flows' memlock with the records in it, and empty.
        var bytes = 0
        var emptyBytes = 0
        var fillSeconds = 0.0
        /// The bench's flows learning recorded (all of them but on a machine too busy to deliver
        /// some datagrams): the others are measured too, by the table, not by their record.
        var learned = 0
        var bytesPerRecord: Double { Double(bytes - emptyBytes) / Double(max(records, 1)) }
    }
    var tables: [Table] = []

    /// A rescale 4 → 6 under live flows, each from a source address of its own in 127/8.
    struct Rescale {
        var flows: Int
        var idleMs: Int
        /// Flows answered by another slot after the change than before it.
        var moved = 0
        /// Flows not delivered at all in the round after the switch.
        var lost = 0
        var untracked: UInt64 = 0
        var rateRefused: UInt64 = 0
        var rateBound = 0
        var records = 0
        var recordBytes = 0
        /// From `beginResize` to the end of the switch's write; and the write alone.
        var toSwitchSeconds = 0.0
        var switchWriteSeconds = 0.0
        /// Seconds one round of every flow took (each flow sends once per round).
        var roundSeconds = 0.0
        var learningRounds = 0
        /// New flows after the switch, and how many landed on the new slots.
        var fresh = 0
        var freshOnNewSlots = 0
        /// One sweep of the records (what the daemon does every quarter of the idle timeout).
        var sweepSeconds = 0.0
    }
    var rescale: Rescale?

    static let tableSizes = [65_536, 1_048_576, 10_485_760]

    static func run(_ settings: Settings, tableSizes: [Int] = tableSizes, rescaleFlows: Int = 1_048_576,
                    rescaleIdleMs: Int = 30_000) throws -> FlowTrackingBench
    {
        var result = FlowTrackingBench()
        let cpus = CPUPlan.choose()
        let statistics = try RunTimeStatistics.enable()
        defer { withExtendedLifetime(statistics) {} }
        try result.measureSteadyState(settings, cpus: cpus)
        for size in tableSizes {
            result.tables.append(try measureTable(records: size, settings, cpus: cpus))
            Log.note("  flow tracking: \(size) records done")
        }
        result.rescale = try measureRescale(flows: rescaleFlows, idleMs: rescaleIdleMs)
        Log.note("  flow tracking: rescale under \(rescaleFlows) flows done")
        return result
    }

    /// `flows` flows, each from its own source address in 127/8, send one datagram per round,
    /// round after round; the service grows 4 → 6 as a change (the learning lasts `idleMs`, so
    /// every flow sends several times within it) and switches; then one more round says which
    /// flows changed slot. The table holds twice the flows; the rate bound is the default.
    static func measureRescale(flows: Int, idleMs: Int) throws -> Rescale {
        var result = Rescale(flows: flows, idleMs: idleMs)
        // The default rate bound: the table's size over the learning window.
        var tracking = ServiceDataPlane.FlowTracking(idleTimeoutMs: idleMs, maxFlows: 2 * flows)
        tracking.drainTimeoutMs = 0
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4,
                                         options: .init(seed: 0x5eed, receiveBuffer: SocketGroup.receiveBuffer,
                                                        tracking: tracking))
        defer { plane.close() }
        let sender = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "udp")
        try Syscall.bind(sender.fd, SocketAddress(IPAddress("0.0.0.0")!, 0), "0.0.0.0:0")
        var destination = sockaddr_in()
        destination.sin_family = sa_family_t(AF_INET)
        destination.sin_port = plane.listeners[0].endpoint.address.port.bigEndian
        destination.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian

        /// One datagram from each source first..<first+count; the slot each landed on (+1; 0: lost).
        func round(first: UInt32, count: Int) -> [UInt8] {
            var slotOf = [UInt8](repeating: 0, count: count)
            let sockets = plane.liveSlots.compactMap { slot in plane.listeners[0].sockets[slot].map { (slot, $0) } }
            let chunk = 2048
            var start = 0
            while start < count {
                let size = min(chunk, count - start)
                let sent = rp_bench_send_from_sources(sender.fd.rawValue, &destination, first + UInt32(start),
                                                      UInt32(size))
                var read = 0
                var quiet = 0
                while read < sent, quiet < 20 {
                    var progress = 0
                    slotOf.withUnsafeMutableBufferPointer { buffer in
                        for (slot, socket) in sockets {
                            progress += rp_bench_drain_sources(socket.fd.rawValue, buffer.baseAddress!, UInt8(slot),
                                                               first, UInt32(count))
                        }
                    }
                    read += progress
                    if progress == 0 { quiet += 1; usleep(1000) } else { quiet = 0 }
                }
                start += size
            }
            return slotOf
        }

        let started = MonotonicClock.seconds()
        let before = round(first: 1, count: flows)
        result.roundSeconds = MonotonicClock.seconds() - started
        let scaleAt = MonotonicClock.nanoseconds()
        try plane.beginResize(to: 6, now: scaleAt)
        let switchAt = plane.pending!.switchNs
        while MonotonicClock.nanoseconds() < switchAt {
            _ = round(first: 1, count: flows)
            result.learningRounds += 1
        }
        let writeStart = MonotonicClock.nanoseconds()
        try plane.advance(now: writeStart)
        let switched = MonotonicClock.nanoseconds()
        result.switchWriteSeconds = Double(switched - writeStart) / 1e9
        result.toSwitchSeconds = Double(switched - scaleAt) / 1e9
        let after = round(first: 1, count: flows)
        for index in 0..<flows {
            if after[index] == 0 { result.lost += 1 } else if after[index] != before[index] { result.moved += 1 }
        }
        result.fresh = 65_536
        result.freshOnNewSlots = round(first: UInt32(flows + 1), count: result.fresh).filter { $0 >= 5 }.count
        result.untracked = try plane.maps.flowCounters().untracked
        result.rateRefused = try plane.maps.flowCounters().rate_refused
        result.rateBound = tracking.effectiveRecordsPerSecond
        result.records = try FlowRecords.count(plane.maps)
        result.recordBytes = try plane.maps.flows.withDescriptor(memlock(of:))
        let sweepStart = MonotonicClock.seconds()
        _ = try plane.sweep(now: MonotonicClock.nanoseconds())
        result.sweepSeconds = MonotonicClock.seconds() - sweepStart
        return result
    }

    /// rp_dispatch with and without the tracking code, on one plane's sockets and tables: the
    /// plane's own program, then the untracked build attached in its place, alternately.
    mutating func measureSteadyState(_ settings: Settings, cpus: CPUPlan) throws {
        let flows = try FlowSet(count: settings.flows, address: .loopbackV4)
        let trackedGroup = try SocketGroup(.steering, sockets: 4, address: .loopbackV4)
        let untrackedGroup = try SocketGroup(.steering, sockets: 4, address: .loopbackV4)
        defer { trackedGroup.close(); untrackedGroup.close() }
        let plane = untrackedGroup.plane!
        try untrackedGroup.replaceProgram(with: DispatchProgram(
            sharing: plane.maps,
            object: (rp_bench_untracked_object(), rp_bench_untracked_object_size(), "dispatch_untracked.bpf.o"),
            socketArray: plane.listeners[0].program.sockets))
        for group in [trackedGroup, untrackedGroup] {
            _ = runTrial(group, flows: flows, workers: 4, seconds: 0.05, cpus: cpus)
        }
        for rep in 0..<settings.costRepeats {
            for group in interleaved([trackedGroup, untrackedGroup], repeat: rep) {
                let cost = try measureCost(group, flows: flows, seconds: settings.costSeconds, cpus: cpus).perRun
                if group === trackedGroup { tracked.append(cost) } else { untracked.append(cost) }
            }
        }
    }

    /// A change 4 → 8 whose learning recorded the bench's flows (only flows of moving buckets
    /// are taken), switched, and `records` records in rp_flows in all.
    static func measureTable(records: Int, _ settings: Settings, cpus: CPUPlan) throws -> Table {
        var table = Table(records: records)
        var tracking = ServiceDataPlane.FlowTracking()
        tracking.maxFlows = records + settings.flows
        tracking.recordsPerSecond = 0
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4,
                                         options: .init(seed: 0x5eed, receiveBuffer: SocketGroup.receiveBuffer,
                                                        tracking: tracking))
        let changing = SocketGroup(plane: plane)
        let steady = try SocketGroup(.steering, sockets: 4, address: .loopbackV4)
        defer { changing.close(); steady.close() }
        table.emptyBytes = try plane.maps.flows.withDescriptor(memlock(of:))

        let now = MonotonicClock.nanoseconds()
        try plane.beginResize(to: 8, now: now, learnNs: 3_600_000_000_000)
        let target = plane.pending!.effective
        let destination = changing.destination
        let count = UInt32(plane.buckets.count)
        let flows = try FlowSet(count: settings.flows, address: .loopbackV4) { source in
            let flow = FlowTuple(.udp, from: source, to: destination)
            let bucket = Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: 0x5eed), count: count))
            return target[bucket] != plane.effectiveBuckets[bucket]
        }
        // Learning records every flow that sends; then the switch pins their buckets.
        let recorded = try learn(flows, at: changing, plane: plane)
        table.learned = recorded
        try plane.advance(now: now, force: true)

        let started = MonotonicClock.seconds()
        var random = SystemRandomNumberGenerator()
        var added = recorded
        let chunk = 65_536
        while added < records + recorded {
            let size = min(chunk, records + recorded - added)
            var keys: [rp_flow_key] = []
            keys.reserveCapacity(size)
            for _ in 0..<size {
                // 10.0.0.0/8 sources, random ports: no bench flow among them.
                var key = rp_flow_key()
                key.family = 4
                key.protocol = UInt8(IPPROTO_UDP)
                key.ports = UInt32.random(in: 1...UInt32.max, using: &random)
                key.addrs.0 = UInt32(10) | UInt32.random(in: 0...0xff_ffff, using: &random) << 8
                key.addrs.1 = 0x0100_007f
                keys.append(key)
            }
            let values = Array(repeating: rp_flow(slot: 0, packets: 1, last_seen_ns: UInt64(now)), count: size)
            added += try plane.insertRecords(keys, values)
        }
        table.fillSeconds = MonotonicClock.seconds() - started
        table.bytes = try plane.maps.flows.withDescriptor(memlock(of:))

        let pinnedBefore = try plane.maps.flowCounters().pinned
        let unrefreshing = try DispatchProgram(
            sharing: plane.maps,
            object: (rp_bench_norefresh_object(), rp_bench_norefresh_object_size(), "dispatch_norefresh.bpf.o"),
            socketArray: plane.listeners[0].program.sockets)
        _ = runTrial(steady, flows: flows, workers: 4, seconds: 0.05, cpus: cpus)
        for rep in 0..<settings.costRepeats {
            // 0: the plane's program; 1: the build without the refresh, attached in its place; 2: steady.
            for variant in interleaved([0, 1, 2], repeat: rep) {
                if variant == 1 { try changing.replaceProgram(with: unrefreshing) }
                let cost = try measureCost(variant == 2 ? steady : changing, flows: flows,
                                           seconds: settings.costSeconds, cpus: cpus).perRun
                if variant == 1 { try changing.restoreProgram() }
                switch variant {
                case 0: table.pinned.append(cost)
                case 1: table.unrefreshed.append(cost)
                default: table.steady.append(cost)
                }
            }
        }
        let pinned = try plane.maps.flowCounters().pinned - pinnedBefore
        guard pinned > 0 else { throw BenchError("no packet was steered by its record: the bench measured nothing") }
        return table
    }

    /// Sends one datagram from each flow, round after round (at most 20, 2 s), until the plane
    /// recorded every flow; returns how many it recorded. Fewer than all is reported, not fatal.
    static func learn(_ flows: FlowSet, at group: SocketGroup, plane: ServiceDataPlane) throws -> Int {
        var recorded = 0
        for _ in 0..<20 where recorded < flows.fds.count {
            sendEach(from: flows, to: group.destination)
            usleep(100_000)
            recorded = try FlowRecords.count(plane.maps)
        }
        if recorded < flows.fds.count { Log.note("  learning recorded \(recorded) of \(flows.fds.count) flows: going on") }
        return recorded
    }

    /// Tracked minus untracked, paired by repeat.
    var steadyCost: Summary? { Summary(zip(tracked, untracked).map { $0 - $1 }) }
}
