#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 2: nanoseconds per run of the steering program against the empty and the
/// fixed-slot programs, from the kernel's BPF run-time statistics, interleaved.
struct ProgramCostBench {
    static let programs: [Selection] = [.emptyProgram, .fixedSlot, .addressLoad, .steering]
        + (SocketGroup.referenceRevision == nil ? [] : [.reference])
    /// rp_dispatch with QUIC steering on, measured in the same run, interleaved with the others.
    static let quicPrograms: [Selection] = [.quicShort, .quicInitial, .quicUnknown]
    static let families: [IPAddress] = [.loopbackV4, .loopbackV6]

    /// family → program → ns per run, one per repeat.
    var nanoseconds: [IPAddress: [Selection: [Double]]] = [:]
    var runs: [IPAddress: [Selection: [UInt64]]] = [:]

    static func run(_ settings: Settings) throws -> ProgramCostBench {
        var result = ProgramCostBench()
        let cpus = CPUPlan.choose()
        let statistics = try RunTimeStatistics.enable()
        defer { withExtendedLifetime(statistics) {} }
        for family in families {
            let flows = try FlowSet(count: settings.flows, address: family)
            let groups = try (programs + quicPrograms).map { try SocketGroup($0, sockets: 4, address: family) }
            defer { for group in groups { group.close() } }
            for group in groups { _ = runTrial(group, flows: flows, workers: 4, seconds: 0.05, cpus: cpus) }
            for rep in 0..<settings.costRepeats {
                for group in interleaved(groups, repeat: rep) {
                    let cost = try measureCost(group, flows: flows, seconds: settings.costSeconds, cpus: cpus)
                    result.nanoseconds[family, default: [:]][group.selection, default: []].append(cost.perRun)
                    result.runs[family, default: [:]][group.selection, default: []].append(cost.runs)
                }
            }
            Log.note("  program cost: \(family.familyName) done")
        }
        return result
    }

    func perRun(_ family: IPAddress, _ selection: Selection) -> [Double] { nanoseconds[family]?[selection] ?? [] }

    /// Steering minus fixed-slot, paired by repeat: what the steering logic itself adds.
    func logicCost(_ family: IPAddress, over baseline: Selection = .fixedSlot) -> Summary? {
        paired(family, .steering, minus: baseline)
    }

    /// `selection` minus `baseline`, paired by repeat (measured next to each other).
    func paired(_ family: IPAddress, _ selection: Selection, minus baseline: Selection) -> Summary? {
        Summary(zip(perRun(family, selection), perRun(family, baseline)).map { $0 - $1 })
    }
}

/// Runs load at `group` and reads how often its program ran and for how long.
func measureCost(_ group: SocketGroup, flows: FlowSet, seconds: Double, cpus: CPUPlan) throws
    -> (perRun: Double, runs: UInt64)
{
    guard let program = group.program else { throw BenchError("\(group.selection.rawValue) has no program") }
    let before = try program.runStatistics()
    _ = runTrial(group, flows: flows, workers: group.sockets.count, seconds: seconds, cpus: cpus)
    let after = try program.runStatistics()
    let runs = after.runs - before.runs
    guard runs > 0 else {
        throw BenchError("\(group.selection.rawValue): the program did not run (are BPF statistics enabled?)")
    }
    return (Double(after.nanoseconds - before.nanoseconds) / Double(runs), runs)
}

/// One variant of a paired measurement: `flows` sent at `group`, with `program` attached in place
/// of the group's own for the variant's trials (nil: the group's own program).
struct CostVariant<Name: Hashable> {
    var name: Name
    var group: SocketGroup
    var flows: FlowSet
    var program: (any ReuseportProgram)? = nil
}

/// ns per run of every variant, `settings.costRepeats` times, interleaved (the order rotates every
/// repeat, as item 2's): element i of each list is repeat i, so the lists pair by index. Each
/// group is warmed up once first.
func measureInterleaved<Name: Hashable>(_ variants: [CostVariant<Name>], _ settings: Settings, cpus: CPUPlan) throws
    -> [Name: [Double]]
{
    var warmed: [ObjectIdentifier] = []
    for variant in variants where !warmed.contains(ObjectIdentifier(variant.group)) {
        warmed.append(ObjectIdentifier(variant.group))
        _ = runTrial(variant.group, flows: variant.flows, workers: variant.group.sockets.count, seconds: 0.05,
                     cpus: cpus)
    }
    var result: [Name: [Double]] = [:]
    for rep in 0..<settings.costRepeats {
        for variant in interleaved(variants, repeat: rep) {
            if let program = variant.program { try variant.group.replaceProgram(with: program) }
            let cost = try measureCost(variant.group, flows: variant.flows, seconds: settings.costSeconds, cpus: cpus)
            if variant.program != nil { try variant.group.restoreProgram() }
            result[variant.name, default: []].append(cost.perRun)
        }
    }
    return result
}
