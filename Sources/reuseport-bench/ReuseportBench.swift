#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ReuseportKit

/// How long and how often each item measures.
struct Settings {
    var repeats = 7
    var trialSeconds = 1.0
    var costRepeats = 7
    var costSeconds = 0.3
    var flows = 256
    var balanceFlows = 100_000
    var scaleRepeats = 3
    var resizeFlows = 8192
    var deathKills = 12
}

@main
struct ReuseportBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reuseport-bench",
        abstract: "Benchmarks reuseportd's steering against the kernel's own SO_REUSEPORT on loopback.",
        discussion: "Needs root (BPF). Writes a Markdown report and a PNG chart beside it (gnuplot).",
        subcommands: [Suite.self],
        defaultSubcommand: Suite.self
    )
}

struct Suite: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the suite (the default).")

    @Option(help: "The Markdown report to write; the chart goes beside it with .png.")
    var output = "docs/benchmarks.md"

    @Option(help: "Items to run, comma-separated (1 throughput, 2 program cost, 3 worker death, 4 resize, 5 balance, 6 scale, 7 flow tracking, 8 two generations).")
    var items = "1,2,3,4,5,6,7,8"

    @Option(help: "Repeats of each throughput trial.")
    var repeats = 7

    @Option(help: "Seconds per throughput trial.")
    var trialSeconds = 1.0

    @Option(help: "Repeats of each program-cost trial (items 2, 7, 8): more narrow the paired differences.")
    var costRepeats = 7

    @Option(help: "The reuseportd binary for item 3 (default: beside this one).")
    var reuseportd: String?

    @Flag(help: "Short trials and few repeats: to try the suite, not to publish numbers.")
    var quick = false

    @Option(help: "Seconds the build before this run took (make bench passes it, for the report).")
    var buildSeconds: Int?

    func validate() throws {
        guard repeats >= 1 else { throw ValidationError("--repeats must be at least 1, not \(repeats)") }
        guard costRepeats >= 1 else { throw ValidationError("--cost-repeats must be at least 1, not \(costRepeats)") }
        guard trialSeconds > 0 else { throw ValidationError("--trial-seconds must be positive, not \(trialSeconds)") }
        for item in items.split(separator: ",") where Int(item).map({ !(1...8).contains($0) }) ?? true {
            throw ValidationError("--items: '\(item)' is not an item number 1-8")
        }
    }

    func run() throws {
        guard geteuid() == 0 else {
            throw ValidationError("the benchmarks load BPF programs and pin CPUs: run them as root")
        }
        var settings = Settings()
        settings.repeats = repeats
        settings.trialSeconds = trialSeconds
        settings.costRepeats = costRepeats
        if quick {
            settings.repeats = min(repeats, 2)
            settings.trialSeconds = min(trialSeconds, 0.3)
            settings.costRepeats = 3
            settings.costSeconds = 0.1
            settings.balanceFlows = 20_000
            settings.scaleRepeats = 1
            settings.resizeFlows = 2048
            settings.deathKills = 4
        }
        raiseFileLimit()
        let selected = Set(items.split(separator: ",").compactMap { Int($0) })
        var report = Report(settings: settings, quick: quick)
        report.buildSeconds = buildSeconds
        let started = MonotonicClock.seconds()
        /// Runs one item; an error is reported as the item's result and the run goes on.
        func measure<Result>(_ item: Int, _ name: String, _ body: () throws -> Result) -> Result? {
            guard selected.contains(item) else { return nil }
            Log.note("\(item). \(name)")
            do {
                return try body()
            } catch {
                Log.note("  \(name) stopped: \(error); going on")
                report.failures.append((item, name, "\(error)"))
                return nil
            }
        }
        let binaries = executableFolder()
        let daemon = reuseportd ?? "\(binaries)/reuseportd"
        report.throughput = measure(1, "throughput") { try ThroughputBench.run(settings) }
        report.cost = measure(2, "program cost") { try ProgramCostBench.run(settings) }
        report.death = measure(3, "worker death") { try WorkerDeathBench.run(settings, daemonBinary: daemon) }
        report.resize = measure(4, "resize") { try ResizeBench.run(settings, daemonBinary: daemon) }
        report.balance = measure(5, "balance") { try BalanceBench.run(settings) }
        report.scale = measure(6, "scale") { try ScaleBench.run(settings) }
        report.tracking = measure(7, "flow tracking") {
            try FlowTrackingBench.run(settings, tableSizes: quick ? [65_536] : FlowTrackingBench.tableSizes,
                                      rescaleFlows: quick ? 65_536 : 1_048_576, rescaleIdleMs: quick ? 10_000 : 30_000)
        }
        report.generations = measure(8, "two generations") { try GenerationBench.run(settings) }
        report.seconds = MonotonicClock.seconds() - started
        try report.write(to: output)
        Log.note("wrote \(output) and \(Report.chartPath(for: output)) in \(Int(report.seconds)) s")
    }
}

/// The folder of this executable (reuseportd is built beside it).
func executableFolder() -> String {
    let path = Syscall.executablePath() ?? ""
    return path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
}

/// The scale runs open more than a thousand sockets at once.
func raiseFileLimit() {
    var limit = rlimit()
    getrlimit(RLIMIT_NOFILE_ENUM, &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(RLIMIT_NOFILE_ENUM, &limit)
}

private let RLIMIT_NOFILE_ENUM = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
