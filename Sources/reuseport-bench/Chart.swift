#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// The PNG beside the report, drawn by gnuplot (pngcairo) from data blocks inlined in
/// its script; one panel per item that ran.
struct Chart {
    var report: Report

    /// Writes the chart; false (and a note) when gnuplot is not there.
    func draw(to path: String) throws -> Bool {
        let panels = self.panels()
        guard !panels.isEmpty else { return false }
        guard let gnuplot = findExecutable("gnuplot") else {
            Log.note("gnuplot not found (make bench installs gnuplot-nox): no chart")
            return false
        }
        let rows = (panels.count + 1) / 2
        var script = "set terminal pngcairo size 1400,\(520 * rows) font 'DejaVu Sans,10'\n"
        script += "set output '\(path)'\n"
        script += "set style data histograms\nset style histogram errorbars gap 1 lw 1\n"
        script += "set style fill solid 0.8 border -1\nset boxwidth 0.9\nset grid ytics\nset key top left\n"
        script += "set multiplot layout \(rows),2\n"
        for panel in panels { script += panel }
        script += "unset multiplot\n"
        let scriptPath = "/tmp/reuseport-bench-\(getpid()).gp"
        try writeFile(scriptPath, &script)
        defer { unlink(scriptPath) }
        let status = try spawnAndWait([gnuplot, scriptPath])
        if status != 0 { throw BenchError("gnuplot \(scriptPath) exited with status \(status)") }
        return true
    }

    /// A clustered bar panel: one row per group, columns (median, min, max) per series.
    func bars(title: String, ylabel: String, series: [String], rows: [(String, [Summary?])], scale: Double = 1,
              yrange: String = "[0:*]") -> String {
        let name = "$d\(abs(title.hashValue % 100000))"
        var text = "\(name) << EOD\n"
        for (label, values) in rows {
            text += "\"\(label)\""
            for value in values {
                if let v = value {
                    text += " \(v.median * scale) \(v.min * scale) \(v.max * scale)"
                } else {
                    text += " 0 0 0"
                }
            }
            text += "\n"
        }
        text += "EOD\n"
        text += "set title \"\(title)\"\nset ylabel \"\(ylabel)\"\nset yrange \(yrange)\n"
        let plots = series.enumerated().map { index, label in
            let c = 2 + index * 3
            return "\(name) using \(c):\(c + 1):\(c + 2)\(index == 0 ? ":xtic(1)" : "") title \"\(label)\""
        }
        text += "plot " + plots.joined(separator: ", ") + "\n"
        return text
    }

    func panels() -> [String] {
        var panels: [String] = []
        if let t = report.throughput {
            panels.append(bars(
                title: "1. Throughput delivered to N workers (median, min-max)", ylabel: "thousand datagrams / s",
                series: ThroughputBench.selections.map(\.rawValue),
                rows: ThroughputBench.workerCounts.map { n in
                    ("N = \(n)", ThroughputBench.selections.map { Summary(t.rates(n, $0)) })
                }, scale: 1e-3))
        }
        if let c = report.cost {
            panels.append(bars(
                title: "2. BPF run time per packet (kernel statistics)", ylabel: "ns per run",
                series: ProgramCostBench.programs.map(\.rawValue),
                rows: ProgramCostBench.families.map { family in
                    (family.familyName, ProgramCostBench.programs.map { Summary(c.perRun(family, $0)) })
                }))
        }
        if let d = report.death, d.error == nil {
            panels.append(bars(
                title: "3. SIGKILL of one worker of 4 under load (per kill: median, min-max)", ylabel: "",
                series: WorkerDeathBench.Mode.allCases.map(\.rawValue),
                rows: [
                    ("% of flows moved", WorkerDeathBench.Mode.allCases.map { mode in
                        Summary(d.kills(mode).compactMap(\.movedShare).map { $0 * 100 })
                    }),
                    ("ms to first answer", WorkerDeathBench.Mode.allCases.map { mode in
                        Summary(d.kills(mode).compactMap(\.firstAnswer).map { $0 * 1000 })
                    }),
                ]))
        }
        if let r = report.resize, !r.steps.isEmpty {
            let grows = r.steps.filter { $0.to > $0.from }
            panels.append(bars(
                title: "4. Flows moved when growing N -> N+1", ylabel: "% of flows moved",
                series: ["ideal 1/(N+1)", "kernel default", "reuseportd"],
                rows: grows.map { step in
                    ("\(step.from) -> \(step.to)", [step.ideal, step.kernel ?? 0, step.reuseportd ?? 0].map { Summary([$0 * 100]) })
                }))
        }
        if let b = report.balance {
            panels.append(bars(
                title: "5. Balance over \(b.flows) flows: busiest worker / mean", ylabel: "busiest / mean",
                series: BalanceBench.selections.map(\.rawValue),
                rows: BalanceBench.workerCounts.map { n in
                    ("N = \(n)", BalanceBench.selections.map { Summary(b.ratios[n]?[$0] ?? []) })
                }, yrange: "[0.95:*]"))
        }
        if let s = report.scale {
            panels.append(bars(
                title: "6. BPF run time per packet as the slots grow (4,096 buckets)", ylabel: "ns per run",
                series: [Selection.fixedSlot.rawValue, Selection.steering.rawValue],
                rows: ScaleBench.slotCounts.map { slots in
                    ("\(slots) slots", [Summary(s.cost(.fixedSlot, slots: slots, buckets: 0)),
                                       Summary(s.cost(.steering, slots: slots, buckets: Int(RP_DEFAULT_BUCKETS)))])
                }))
        }
        return panels
    }
}

/// The first `name` on PATH that is executable.
func findExecutable(_ name: String) -> String? {
    let path = String(cString: getenv("PATH") ?? strdup("/usr/bin:/bin"))
    for folder in path.split(separator: ":") where access("\(folder)/\(name)", X_OK) == 0 {
        return "\(folder)/\(name)"
    }
    return nil
}

/// Runs `arguments` to the end; returns its exit status (128 + signal if killed).
func spawnAndWait(_ arguments: [String]) throws -> Int32 {
    try ProcessSpawn(path: arguments[0], arguments: arguments).run().shellStatus
}
