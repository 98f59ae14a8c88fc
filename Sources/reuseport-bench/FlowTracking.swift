#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import SystemPackage
import ReuseportKit

/// Item 7: what flow tracking costs. BPF run-time statistics, variants interleaved and paired
/// by repeat, as item 2, on IPv4 and IPv6 (loopback) in one run:
/// - steady state: rp_dispatch against the same program built without flow tracking
///   (RP_NO_FLOW_TRACKING), on the same sockets and tables;
/// - during a change: the same flows once their buckets are pinned and each has a record, in
///   tables of 64k, 1M and 10M records (IPv6: 64k only), against the same flows on a service in
///   steady state; and what the kernel charges for the records;
/// - what a flow key sized per family would save (IPv4, 64k records): rp_dispatch's pinned path
///   alone (bpf/flow_key_cost.bpf.c) with the 40-octet key and with a 16-octet one, on the same
///   sockets, each with a copy of the same records.
struct FlowTrackingBench {
    /// Steady state, by family: ns per run, by repeat (paired).
    var tracked: [IPAddress: [Double]] = [:]
    var untracked: [IPAddress: [Double]] = [:]

    struct Table {
        var records: Int
        var family: IPAddress
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
        /// The key comparison, measured beside this table's variants (IPv4, the smallest table).
        var keys: KeyCost?
        var bytesPerRecord: Double { Double(bytes - emptyBytes) / Double(max(records, 1)) }
        /// Pinned minus steady, paired by repeat.
        var pinnedExtra: Summary? { Summary(zip(pinned, steady).map { $0 - $1 }) }
    }
    var tables: [Table] = []

    /// rp_dispatch's pinned path alone with either flow key (`FlowKeyCostProgram`), each program's
    /// table holding a copy of the records of the table's rp_flows.
    struct KeyCost {
        /// ns per run with the 40-octet key and with the 16-octet IPv4 key, paired by repeat.
        var shared: [Double] = []
        var ipv4: [Double] = []
        /// Memory per record of each program's table (memlock, full minus empty, over the records).
        var sharedBytesPerRecord = 0.0
        var ipv4BytesPerRecord = 0.0
        var records = 0
        /// Packets the two programs sent to their recorded slot, and packets that found no record.
        var pinned: UInt64 = 0
        var missed: UInt64 = 0
        /// What the shorter key saves per packet, paired.
        var saving: Summary? { Summary(zip(shared, ipv4).map { $0 - $1 }) }
    }

    static let families = ProgramCostBench.families

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
            // IPv6 and the key comparison at the smallest table only: the run time stays of the same order.
            let smallest = size == tableSizes.min()
            result.tables += try measureTables(records: size, families: smallest ? families : [.loopbackV4],
                                               keyCost: smallest, settings, cpus: cpus)
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

    /// rp_dispatch with and without the tracking code, on one plane's sockets and tables, per
    /// family: the plane's own program, then the untracked build attached in its place.
    mutating func measureSteadyState(_ settings: Settings, cpus: CPUPlan) throws {
        struct Variant: Hashable {
            var family: IPAddress
            var tracked: Bool
        }
        var groups: [SocketGroup] = []
        defer { for group in groups { group.close() } }
        var variants: [CostVariant<Variant>] = []
        for family in Self.families {
            let flows = try FlowSet(count: settings.flows, address: family)
            let trackedGroup = try SocketGroup(.steering, sockets: 4, address: family)
            groups.append(trackedGroup)
            let untrackedGroup = try SocketGroup(.steering, sockets: 4, address: family)
            groups.append(untrackedGroup)
            let plane = untrackedGroup.plane!
            try untrackedGroup.replaceProgram(with: DispatchProgram(
                sharing: plane.maps,
                object: (rp_bench_untracked_object(), rp_bench_untracked_object_size(), "dispatch_untracked.bpf.o"),
                socketArray: plane.listeners[0].program.sockets))
            variants.append(CostVariant(name: Variant(family: family, tracked: true), group: trackedGroup,
                                        flows: flows))
            variants.append(CostVariant(name: Variant(family: family, tracked: false), group: untrackedGroup,
                                        flows: flows))
        }
        let costs = try measureInterleaved(variants, settings, cpus: cpus)
        for family in Self.families {
            tracked[family] = costs[Variant(family: family, tracked: true)]
            untracked[family] = costs[Variant(family: family, tracked: false)]
        }
    }

    /// The variants of the tables' measurement.
    enum TableVariant: Hashable {
        case pinned(IPAddress), unrefreshed(IPAddress), steady(IPAddress), key(FlowKeyCostProgram.Key)
    }

    /// A table of `records` records for each of `families`, their variants interleaved together,
    /// and with `keyCost` the key comparison on the IPv4 one's sockets and records.
    static func measureTables(records: Int, families: [IPAddress], keyCost: Bool, _ settings: Settings,
                              cpus: CPUPlan) throws -> [Table]
    {
        var services: [ChangingService] = []
        defer { for service in services { service.close() } }
        for family in families { services.append(try ChangingService(records: records, family: family, settings)) }
        var variants = services.flatMap { service -> [CostVariant<TableVariant>] in
            let family = service.table.family
            return [CostVariant(name: .pinned(family), group: service.changing, flows: service.flows),
                    CostVariant(name: .unrefreshed(family), group: service.changing, flows: service.flows,
                                program: service.unrefreshing),
                    CostVariant(name: .steady(family), group: service.services.steady, flows: service.flows)]
        }
        var keyPrograms: [FlowKeyCostProgram] = []
        var keys = KeyCost()
        let keyService = keyCost ? services.firstIndex { $0.table.family.isV4 } : nil
        if let keyService {
            let service = services[keyService]
            for key in [FlowKeyCostProgram.Key.shared, .ipv4] {
                let (program, bytesPerRecord, copied) = try service.keyCostProgram(key)
                keyPrograms.append(program)
                if key == .shared {
                    keys.sharedBytesPerRecord = bytesPerRecord
                } else {
                    keys.ipv4BytesPerRecord = bytesPerRecord
                }
                keys.records = copied
                variants.append(CostVariant(name: .key(key), group: service.changing, flows: service.flows,
                                            program: program))
            }
        }
        let pinnedBefore = try services.map { try $0.services.plane.maps.flowCounters().pinned }
        let costs = try measureInterleaved(variants, settings, cpus: cpus)
        var tables: [Table] = []
        for (service, before) in zip(services, pinnedBefore) {
            var table = service.table
            table.pinned = costs[.pinned(table.family)] ?? []
            table.unrefreshed = costs[.unrefreshed(table.family)] ?? []
            table.steady = costs[.steady(table.family)] ?? []
            guard try service.services.plane.maps.flowCounters().pinned > before else {
                throw BenchError("no \(table.family) packet was steered by its record: the bench measured nothing")
            }
            tables.append(table)
        }
        if let keyService {
            keys.shared = costs[.key(.shared)] ?? []
            keys.ipv4 = costs[.key(.ipv4)] ?? []
            for program in keyPrograms {
                let counters = try program.counters()
                keys.pinned += counters.pinned
                keys.missed += counters.missed
            }
            guard keys.pinned > 0 else {
                throw BenchError("no packet was steered by its record in the flow key programs: they measured nothing")
            }
            tables[keyService].keys = keys
        }
        return tables
    }

    /// One family's service for a table: a change 4 → 8 whose learning recorded the bench's flows
    /// (only flows of moving buckets are taken), switched, and `records` records in rp_flows in all;
    /// beside it a service of the same family in steady state.
    struct ChangingService {
        var services: TrackingServices
        var changing: SocketGroup
        var flows: FlowSet
        /// rp_dispatch built without a record's refresh, on the plane's maps and sockets.
        var unrefreshing: DispatchProgram
        /// What is known before the measurement: sizes, memory, learning.
        var table: Table

        init(records: Int, family: IPAddress, _ settings: Settings) throws {
            table = Table(records: records, family: family)
            let services = try TrackingServices(family: family, maxFlows: records + settings.flows)
            self.services = services
            let plane = services.plane
            let changing = SocketGroup(plane: plane)
            self.changing = changing
            do {
                table.emptyBytes = try plane.maps.flows.withDescriptor(memlock(of:))
                let now = MonotonicClock.nanoseconds()
                try plane.beginResize(to: 8, now: now, learnNs: 3_600_000_000_000)
                let target = plane.pending!.effective
                let destination = changing.destination
                let count = UInt32(plane.buckets.count)
                flows = try FlowSet(count: settings.flows, address: family) { source in
                    let flow = FlowTuple(.udp, from: source, to: destination)
                    let bucket = Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: 0x5eed), count: count))
                    return target[bucket] != plane.effectiveBuckets[bucket]
                }
                // Learning records every flow that sends; then the switch pins their buckets.
                table.learned = try FlowTrackingBench.learn(flows, at: changing, plane: plane)
                try plane.advance(now: now, force: true)
                let started = MonotonicClock.seconds()
                try Self.fill(plane, with: records, family: family, now: UInt64(now))
                table.fillSeconds = MonotonicClock.seconds() - started
                table.bytes = try plane.maps.flows.withDescriptor(memlock(of:))
                unrefreshing = try DispatchProgram(
                    sharing: plane.maps,
                    object: (rp_bench_norefresh_object(), rp_bench_norefresh_object_size(), "dispatch_norefresh.bpf.o"),
                    socketArray: plane.listeners[0].program.sockets)
            } catch {
                services.close()
                throw error
            }
        }

        func close() { services.close() }

        /// Adds `records` random records of `family` to rp_flows: 10.0.0.0/8 or fd00::/8 sources,
        /// random ports, no bench flow among them.
        static func fill(_ plane: ServiceDataPlane, with records: Int, family: IPAddress, now: UInt64) throws {
            var random = SystemRandomNumberGenerator()
            var added = 0
            let chunk = 65_536
            while added < records {
                let size = min(chunk, records - added)
                var keys: [rp_flow_key] = []
                keys.reserveCapacity(size)
                for _ in 0..<size {
                    var key = rp_flow_key()
                    key.protocol = UInt8(IPPROTO_UDP)
                    key.ports = UInt32.random(in: 1...UInt32.max, using: &random)
                    // Words as the packet has the addresses: network order, read on this little-endian host.
                    if family.isV4 {
                        key.family = 4
                        key.addrs.0 = UInt32(10) | UInt32.random(in: 0...0xff_ffff, using: &random) << 8
                        key.addrs.1 = 0x0100_007f
                    } else {
                        key.family = 6
                        key.addrs.0 = UInt32(0xfd) | UInt32.random(in: 0...0xff_ffff, using: &random) << 8
                        key.addrs.1 = UInt32.random(in: 0...UInt32.max, using: &random)
                        key.addrs.2 = UInt32.random(in: 0...UInt32.max, using: &random)
                        key.addrs.3 = UInt32.random(in: 0...UInt32.max, using: &random)
                        key.addrs.7 = 0x0100_0000
                    }
                    keys.append(key)
                }
                let values = Array(repeating: rp_flow(slot: 0, packets: 1, last_seen_ns: now), count: size)
                let inserted = try plane.insertRecords(keys, values)
                guard inserted > 0 else { throw BenchError("rp_flows took no more records after \(added)") }
                added += inserted
            }
        }

        /// The pinned path alone with `key`, on this plane's sockets, its table holding a copy of
        /// rp_flows' records; with the memory per record it charged and how many it holds.
        func keyCostProgram(_ key: FlowKeyCostProgram.Key) throws
            -> (program: FlowKeyCostProgram, bytesPerRecord: Double, records: Int)
        {
            let plane = services.plane
            let ipv4 = key == .ipv4
            var size = 0
            let object = rp_bench_flow_key_object(ipv4 ? 1 : 0, &size)!
            let program = try FlowKeyCostProgram(
                object: object, count: size, name: ipv4 ? "flow_key_ipv4.bpf.o" : "flow_key_shared.bpf.o", key: key,
                records: Int(plane.maps.flows.maxEntries), socketArray: plane.listeners[0].program.sockets)
            let empty = try program.flows.withDescriptor(memlock(of:))
            let entries = try plane.maps.flows.entries(as: (rp_flow_key, rp_flow).self)
            let copied = try program.insert(entries.map(\.key), entries.map(\.value))
            let bytes = try program.flows.withDescriptor(memlock(of:))
            return (program, Double(bytes - empty) / Double(max(copied, 1)), copied)
        }
    }

    /// What items 7 and 8 pair: a service of 4 slots of one family whose flow tracking takes up to
    /// `maxFlows` records without a rate bound (the one a change runs in), and a service of that
    /// family in steady state. Closed together.
    struct TrackingServices {
        let plane: ServiceDataPlane
        let steady: SocketGroup

        init(family: IPAddress, maxFlows: Int) throws {
            var tracking = ServiceDataPlane.FlowTracking()
            tracking.maxFlows = maxFlows
            tracking.recordsPerSecond = 0
            plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(family, 0))], slotCount: 4,
                                         options: .init(seed: 0x5eed, receiveBuffer: SocketGroup.receiveBuffer,
                                                        tracking: tracking))
            do {
                steady = try SocketGroup(.steering, sockets: 4, address: family)
            } catch {
                plane.close()
                throw error
            }
        }

        /// Closes both services (the plane's sockets with it).
        func close() {
            plane.close()
            steady.close()
        }
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
    func steadyCost(_ family: IPAddress) -> Summary? {
        Summary(zip(tracked[family] ?? [], untracked[family] ?? []).map { $0 - $1 })
    }
}
