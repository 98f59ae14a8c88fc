#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import ReuseportKit

/// Item 6: map memory, and the program's cost per packet as the slot count (up to
/// RP_MAX_SLOTS) and the bucket table (up to RP_MAX_BUCKETS) grow.
struct ScaleBench {
    struct Config: Hashable {
        var selection: Selection
        var slots: Int
        var buckets: Int
    }

    static let slotCounts = [1, 16, 128, Int(RP_MAX_SLOTS)]
    static let bucketCounts = [64, Int(RP_DEFAULT_BUCKETS), Int(RP_MAX_BUCKETS)]
    static let bucketSlots = 16

    struct MapMemory {
        var name: String
        var type: String
        var entries: UInt32
        var valueSize: Int
        var bytes: Int
        var perListener: Bool
    }

    var perRun: [Config: [Double]] = [:]
    var memory: [MapMemory] = []
    var programBytes = 0
    var flows = 0

    /// What one service's maps and program cost, by shape (default settings but the slots).
    struct ServiceMemory {
        var slots: Int
        var buckets: Int
        var trackedFlows: Int
        var maps: [MapMemory]
        var programBytes: Int
        var bytes: Int { maps.map(\.bytes).reduce(0, +) + programBytes }
    }
    var services: [ServiceMemory] = []
    /// `manyCount` default services of 4 workers started one after another: seconds, and memory.
    static let manyCount = 100
    var manySeconds = 0.0
    var manyBytes = 0
    var manyError: String?

    /// The memory of a default service of `slots` workers (one UDP listener).
    static func serviceMemory(slots: Int) throws -> ServiceMemory {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: slots)
        defer { plane.close() }
        let (maps, program) = try mapMemory(plane)
        return ServiceMemory(slots: slots, buckets: plane.options.bucketCount, trackedFlows: plane.options.tracking.maxFlows ?? 0,
                             maps: maps, programBytes: program)
    }

    /// Starts `manyCount` default services of 4 workers, as a daemon would (sockets, program, maps,
    /// tables), and reads what the kernel charges for all of them together.
    mutating func measureMany() throws {
        var planes: [ServiceDataPlane] = []
        defer { for plane in planes { plane.close() } }
        let started = MonotonicClock.seconds()
        for _ in 0..<Self.manyCount {
            planes.append(try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4))
        }
        manySeconds = MonotonicClock.seconds() - started
        manyBytes = try planes.reduce(0) { sum, plane in
            let (maps, program) = try mapMemory(plane)
            return sum + maps.map(\.bytes).reduce(0, +) + program
        }
    }

    static var configs: [Config] {
        var configs: [Config] = []
        for slots in slotCounts {
            configs.append(Config(selection: .fixedSlot, slots: slots, buckets: 0))
            configs.append(Config(selection: .steering, slots: slots, buckets: Int(RP_DEFAULT_BUCKETS)))
        }
        for buckets in bucketCounts where buckets != Int(RP_DEFAULT_BUCKETS) {
            configs.append(Config(selection: .steering, slots: bucketSlots, buckets: buckets))
        }
        return configs
    }

    static func run(_ settings: Settings) throws -> ScaleBench {
        var result = ScaleBench()
        let cpus = CPUPlan.choose()
        let statistics = try RunTimeStatistics.enable()
        defer { withExtendedLifetime(statistics) {} }
        let flows = try FlowSet(count: 1024, address: .loopbackV4)
        result.flows = flows.fds.count
        var groups: [Config: SocketGroup] = [:]
        defer { for group in groups.values { group.close() } }
        for config in configs {
            groups[config] = try SocketGroup(config.selection, sockets: config.slots, address: .loopbackV4,
                                             bucketCount: max(config.buckets, 1))
        }
        let largest = groups[Config(selection: .steering, slots: Int(RP_MAX_SLOTS), buckets: Int(RP_DEFAULT_BUCKETS))]!
        (result.memory, result.programBytes) = try mapMemory(largest.plane!)
        result.services = try [4, Int(RP_MAX_SLOTS)].map { try serviceMemory(slots: $0) }
        do {
            try result.measureMany()
        } catch {
            result.manyError = "\(error)"
        }
        Log.note("  scale: memory done")
        for rep in 0..<max(1, settings.scaleRepeats) {
            for config in interleaved(configs, repeat: rep) {
                let group = groups[config]!
                let before = try group.program!.runStatistics()
                let receivers = ReceiverGroup(fds: group.fds, threads: 1, cpu: cpus.receivers)
                let destination = group.destination
                let sender = PinnedThread(cpu: cpus.sender) {
                    _ = blast(from: flows, to: destination, seconds: settings.costSeconds)
                }
                sender.join()
                _ = receivers.stop()
                let after = try group.program!.runStatistics()
                let runs = after.runs - before.runs
                guard runs > 0 else { throw BenchError("scale: the program of \(config) did not run") }
                result.perRun[config, default: []].append(Double(after.nanoseconds - before.nanoseconds) / Double(runs))
            }
            Log.note("  scale: repeat \(rep + 1)/\(max(1, settings.scaleRepeats)) done")
        }
        return result
    }

    func cost(_ selection: Selection, slots: Int, buckets: Int) -> [Double] {
        perRun[Config(selection: selection, slots: slots, buckets: selection == .fixedSlot ? 0 : buckets)] ?? []
    }
}

/// What the kernel charges for each map of a service (`memlock:` in /proc/self/fdinfo,
/// the figure kernels before 5.11 count against RLIMIT_MEMLOCK and later ones charge to
/// the memory cgroup), and for the program.
func mapMemory(_ plane: ServiceDataPlane) throws -> ([ScaleBench.MapMemory], Int) {
    let listener = plane.listeners[0].program
    let all = plane.maps.all.map { ($0, false) } + [(listener.sockets.map, true)]
    let memory = try all.map { map, perListener in
        ScaleBench.MapMemory(name: map.name, type: mapTypeName(map.type), entries: map.maxEntries,
                             valueSize: map.valueSize, bytes: try map.withDescriptor(memlock(of:)), perListener: perListener)
    }
    return (memory, try memlock(of: listener.programFD))
}

func memlock(of fd: Int32) throws -> Int {
    let text = try readText("/proc/self/fdinfo/\(fd)")
    guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("memlock:") }),
          let value = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).last.flatMap({ Int($0) })
    else { throw BenchError("/proc/self/fdinfo/\(fd) has no memlock line") }
    return value
}

/// libbpf's name of a map type ("array", "reuseport_sockarray"), upper-cased as in the UAPI.
func mapTypeName(_ type: UInt32) -> String {
    guard let name = libbpf_bpf_map_type_str(bpf_map_type(rawValue: type)) else { return "type \(type)" }
    return String(cString: name).uppercased()
}
