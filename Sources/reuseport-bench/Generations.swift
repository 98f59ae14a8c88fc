#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 8: what a service pays per packet while two generations run (an upgrade drains), against
/// one generation in steady state. BPF run-time statistics, variants interleaved and paired by
/// repeat, as items 2 and 7. A generation change is a placement change of every bucket: once it
/// switched, every bucket is pinned, so every packet looks for a record in `rp_flows`:
/// - the old generation's flows find theirs (recorded while the switch learned) and go to it;
/// - flows new since the switch find none and follow the table to the new generation.
struct GenerationBench {
    /// ns per run: old-generation flows, new flows, the same old flows on a steady service.
    var oldFlows: [Double] = []
    var newFlows: [Double] = []
    var steady: [Double] = []
    /// Packets steered by their record during the measurement (proves the pinned path ran).
    var pinnedPackets: UInt64 = 0
    /// The old generation's flows the switch recorded (all but on a machine too busy to deliver some).
    var learned = 0
    var flows = 0

    static func run(_ settings: Settings) throws -> GenerationBench {
        var result = GenerationBench()
        let cpus = CPUPlan.choose()
        let statistics = try RunTimeStatistics.enable()
        defer { withExtendedLifetime(statistics) {} }
        var tracking = ServiceDataPlane.FlowTracking()
        tracking.maxFlows = 4 * settings.flows
        tracking.recordsPerSecond = 0
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4,
                                         options: .init(seed: 0x5eed, receiveBuffer: SocketGroup.receiveBuffer,
                                                        tracking: tracking))
        let now = MonotonicClock.nanoseconds()
        _ = try plane.startGeneration(count: 4, now: now)
        // Both generations' sockets are read: 8 receivers.
        let upgrading = SocketGroup(plane: plane)
        let steady = try SocketGroup(.steering, sockets: 4, address: .loopbackV4)
        defer { upgrading.close(); steady.close() }
        let old = try FlowSet(count: settings.flows, address: .loopbackV4)
        try plane.switchGeneration(now: now, learnNs: 3_600_000_000_000)
        result.flows = settings.flows
        result.learned = try FlowTrackingBench.learn(old, at: upgrading, plane: plane)
        try plane.advance(now: now, force: true)
        let new = try FlowSet(count: settings.flows, address: .loopbackV4)
        let pinnedBefore = try plane.maps.flowCounters().pinned
        _ = runTrial(steady, flows: old, workers: 4, seconds: 0.05, cpus: cpus)
        for rep in 0..<settings.costRepeats {
            let variants: [(group: SocketGroup, flows: FlowSet)] = [(upgrading, old), (upgrading, new), (steady, old)]
            for index in interleaved(Array(variants.indices), repeat: rep) {
                let (group, flows) = variants[index]
                let cost = try measureCost(group, flows: flows, seconds: settings.costSeconds, cpus: cpus).perRun
                switch index {
                case 0: result.oldFlows.append(cost)
                case 1: result.newFlows.append(cost)
                default: result.steady.append(cost)
                }
            }
        }
        result.pinnedPackets = try plane.maps.flowCounters().pinned - pinnedBefore
        guard result.pinnedPackets > 0 else {
            throw BenchError("no packet was steered by its record: the bench measured nothing")
        }
        return result
    }
}

extension Report {
    func generationSection(_ g: GenerationBench) -> [String] {
        var lines = ["## 8. Two generations", ""]
        lines.append(runTimeMethod(as: "items 2 and 7", flows: "\(settings.flows) flows per variant")
            + " A service of 4 slots started a generation of "
            + "4 beside them, learned the bench's flows and switched: every bucket is pinned while the old "
            + "generation drains. **Old flows** find their record and go to the old generation; **new flows** "
            + "(sources not seen before the switch) find none and follow the table to the new one. Against the "
            + "old flows on a service of one generation in steady state. \(g.pinnedPackets) packets were "
            + "steered by their record." + (g.learned < g.flows ? " The switch learned \(g.learned) of \(g.flows) "
            + "old flows within 2 s (a busy machine): the others were measured too, following the table." : ""))
        lines.append("")
        lines.append("| flows | two generations ns/run | one generation, steady ns/run | difference (paired) |")
        lines.append("| --- | --- | --- | --- |")
        for (name, costs) in [("old generation's (recorded)", g.oldFlows), ("new since the switch", g.newFlows)] {
            let difference = Summary(zip(costs, g.steady).map { $0 - $1 })
            lines.append("| \(name) | \(summaryText(Summary(costs), digits: 1)) | "
                + "\(summaryText(Summary(g.steady), digits: 1)) | \(summaryText(difference, digits: 1)) |")
        }
        lines.append("")
        return lines
    }
}
