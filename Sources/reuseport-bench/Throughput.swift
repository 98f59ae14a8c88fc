#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 1: datagrams per second delivered to N workers, one socket against kernel
/// reuseport against reuseportd's steering, interleaved and repeated in one run.
struct ThroughputBench {
    static let workerCounts = [1, 2, 4]
    static let selections: [Selection] = [.oneSocket, .kernel, .fixedSlot, .steering]
    static let slices = 5

    struct Cell {
        var trials: [TrialResult] = []
        var rates: [Double] { trials.map(\.deliveredRate) }
        var ratesPerCPU: [Double] { trials.map(\.deliveredPerCPUSecond) }
    }

    var cells: [Int: [Selection: Cell]] = [:]
    var cpus = CPUPlan()
    var flowCount = 0

    static func run(_ settings: Settings) throws -> ThroughputBench {
        var result = ThroughputBench()
        result.cpus = CPUPlan.choose()
        let flows = try FlowSet(count: settings.flows, address: .loopbackV4)
        result.flowCount = flows.fds.count
        var groups: [Int: [Selection: SocketGroup]] = [:]
        for n in workerCounts {
            for selection in selections {
                groups[n, default: [:]][selection] = try SocketGroup(selection, sockets: n, address: .loopbackV4)
            }
        }
        defer { for byN in groups.values { for group in byN.values { group.close() } } }

        // Warm-up (caches, page faults, socket memory) outside the measurement.
        for n in workerCounts {
            for selection in selections {
                _ = runTrial(groups[n]![selection]!, flows: flows, workers: n, seconds: 0.1, cpus: result.cpus)
            }
        }
        // Each repeat's trial of a variant is made of `slices` slices, the variants taking
        // turns slice by slice: a burst of load from other processes then hits all of them.
        for rep in 0..<settings.repeats {
            for n in workerCounts {
                var trials: [Selection: TrialResult] = [:]
                for slice in 0..<slices {
                    for selection in interleaved(selections, repeat: rep + n + slice) {
                        let trial = runTrial(groups[n]![selection]!, flows: flows, workers: n,
                                             seconds: settings.trialSeconds / Double(slices), cpus: result.cpus)
                        trials[selection] = trials[selection].map { $0 + trial } ?? trial
                    }
                }
                for (selection, trial) in trials {
                    result.cells[n, default: [:]][selection, default: Cell()].trials.append(trial)
                }
            }
            Log.note("  throughput: repeat \(rep + 1)/\(settings.repeats) done")
        }
        return result
    }

    func rates(_ n: Int, _ selection: Selection) -> [Double] { cells[n]?[selection]?.rates ?? [] }

    func ratio(_ n: Int, _ selection: Selection = .steering) -> Summary? {
        Summary(pairedRatios(rates(n, selection), rates(n, .kernel)))
    }

    func ratesPerCPU(_ n: Int, _ selection: Selection) -> [Double] { cells[n]?[selection]?.ratesPerCPU ?? [] }

    func ratioPerCPU(_ n: Int, _ selection: Selection = .steering) -> Summary? {
        Summary(pairedRatios(ratesPerCPU(n, selection), ratesPerCPU(n, .kernel)))
    }

    var allTrials: [TrialResult] { cells.values.flatMap { $0.values.flatMap(\.trials) } }
}
