#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 8: what a service pays per packet while two generations run (an upgrade drains), against
/// one generation in steady state. BPF run-time statistics, variants interleaved and paired by
/// repeat, as items 2 and 7, on IPv4 and IPv6 (loopback) in one run. A generation change is a
/// placement change of every bucket: once it switched, every bucket is pinned, so every packet
/// looks for a record in `rp_flows`:
/// - the old generation's flows find theirs (recorded while the switch learned) and go to it;
/// - flows new since the switch find none and follow the table to the new generation.
struct GenerationBench {
    struct Figures {
        /// ns per run: old-generation flows, new flows, the same old flows on a steady service.
        var oldFlows: [Double] = []
        var newFlows: [Double] = []
        var steady: [Double] = []
        /// Packets steered by their record during the measurement (proves the pinned path ran).
        var pinnedPackets: UInt64 = 0
        /// The old generation's flows the switch recorded (all but on a machine too busy to deliver some).
        var learned = 0

        /// Old flows minus steady, paired by repeat.
        var oldFlowsExtra: Summary? { Summary(zip(oldFlows, steady).map { $0 - $1 }) }
    }
    var figures: [IPAddress: Figures] = [:]
    var flows = 0

    static let families = ProgramCostBench.families

    enum Variant: Hashable {
        case oldFlows(IPAddress), newFlows(IPAddress), steady(IPAddress)
    }

    /// One family's service of 4 slots that started a generation of 4 beside them, learned `old`
    /// and switched; and a service of one generation in steady state.
    struct Upgrade {
        var services: FlowTrackingBench.TrackingServices
        var upgrading: SocketGroup
        var old: FlowSet
        var new: FlowSet
        var learned: Int

        init(family: IPAddress, _ settings: Settings) throws {
            let services = try FlowTrackingBench.TrackingServices(family: family, maxFlows: 4 * settings.flows)
            self.services = services
            let plane = services.plane
            do {
                let now = MonotonicClock.nanoseconds()
                _ = try plane.startGeneration(count: 4, now: now)
                // Both generations' sockets are read: 8 receivers.
                let upgrading = SocketGroup(plane: plane)
                self.upgrading = upgrading
                old = try FlowSet(count: settings.flows, address: family)
                try plane.switchGeneration(now: now, learnNs: 3_600_000_000_000)
                learned = try FlowTrackingBench.learn(old, at: upgrading, plane: plane)
                try plane.advance(now: now, force: true)
                new = try FlowSet(count: settings.flows, address: family)
            } catch {
                services.close()
                throw error
            }
        }

        func close() { services.close() }
    }

    static func run(_ settings: Settings) throws -> GenerationBench {
        var result = GenerationBench()
        result.flows = settings.flows
        let cpus = CPUPlan.choose()
        let statistics = try RunTimeStatistics.enable()
        defer { withExtendedLifetime(statistics) {} }
        var upgrades: [IPAddress: Upgrade] = [:]
        defer { for upgrade in upgrades.values { upgrade.close() } }
        for family in families { upgrades[family] = try Upgrade(family: family, settings) }
        let variants = families.flatMap { family -> [CostVariant<Variant>] in
            let upgrade = upgrades[family]!
            return [CostVariant(name: .oldFlows(family), group: upgrade.upgrading, flows: upgrade.old),
                    CostVariant(name: .newFlows(family), group: upgrade.upgrading, flows: upgrade.new),
                    CostVariant(name: .steady(family), group: upgrade.services.steady, flows: upgrade.old)]
        }
        let pinnedBefore = try upgrades.mapValues { try $0.services.plane.maps.flowCounters().pinned }
        let costs = try measureInterleaved(variants, settings, cpus: cpus)
        for family in families {
            var figures = Figures(oldFlows: costs[.oldFlows(family)] ?? [], newFlows: costs[.newFlows(family)] ?? [],
                                  steady: costs[.steady(family)] ?? [], learned: upgrades[family]!.learned)
            figures.pinnedPackets = try upgrades[family]!.services.plane.maps.flowCounters().pinned - pinnedBefore[family]!
            guard figures.pinnedPackets > 0 else {
                throw BenchError("no \(family) packet was steered by its record: the bench measured nothing")
            }
            result.figures[family] = figures
        }
        return result
    }
}

extension Report {
    func generationSection(_ g: GenerationBench) -> [String] {
        var lines = ["## 8. Two generations", ""]
        let families = GenerationBench.families
        let pinned = families.map { "\(g.figures[$0]?.pinnedPackets ?? 0) (\($0.familyName))" }
        let unlearned = families.compactMap { family -> String? in
            guard let learned = g.figures[family]?.learned, learned < g.flows else { return nil }
            return "\(learned) of \(g.flows) \(family.familyName)"
        }
        lines.append(runTimeMethod(as: "items 2 and 7", flows: "\(settings.flows) flows per variant")
            + " For each family, a service of 4 slots started a generation of "
            + "4 beside them, learned the bench's flows and switched: every bucket is pinned while the old "
            + "generation drains. **Old flows** find their record and go to the old generation; **new flows** "
            + "(sources not seen before the switch) find none and follow the table to the new one. Against the "
            + "old flows on a service of one generation in steady state. Both families' variants are interleaved in "
            + "one run, each family on services of its own. \(pinned.joined(separator: " and ")) packets were "
            + "steered by their record." + (unlearned.isEmpty ? "" : " The switch learned "
            + unlearned.joined(separator: " and ") + " old flows within 2 s (a busy machine): the others were "
            + "measured too, following the table."))
        lines.append("")
        lines.append("| family | flows | two generations ns/run | one generation, steady ns/run "
            + "| difference (paired) |")
        lines.append("| --- | --- | --- | --- | --- |")
        for family in families {
            guard let figures = g.figures[family] else { continue }
            for (name, costs) in [("old generation's (recorded)", figures.oldFlows),
                                  ("new since the switch", figures.newFlows)] {
                let difference = Summary(zip(costs, figures.steady).map { $0 - $1 })
                lines.append("| \(family.familyName) | \(name) | \(summaryText(Summary(costs), digits: 1)) | "
                    + "\(summaryText(Summary(figures.steady), digits: 1)) | \(summaryText(difference, digits: 1)) |")
            }
        }
        lines.append("")
        return lines
    }
}
