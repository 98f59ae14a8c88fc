#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ReuseportControl
import ReuseportKit

/// `stats`: the program's counters per slot and in total.
struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Counters per slot and totals; rates with --watch; Prometheus text with --prometheus.",
        discussion: """
            PACKETS are datagrams (UDP) or connection requests (TCP) the program steered to the slot, \
            BYTES their UDP payload, FALLBACKS those that came because their own slot was empty, DROPS \
            what the kernel dropped at the slot's socket(s) (receive buffer full). The global line \
            counts what reached no slot: dropped_no_slot (no live slot, or no configuration), \
            unparsable, fallbacks, select_errors. A service with QUIC steering adds its QUIC counters \
            (docs/quic.md): packets steered by connection ID (in total and per slot), Initials, long \
            headers steered by the hash of their DCID, unknown CIDs, fallbacks (CIDs naming a slot \
            without a socket), version negotiation and unparsable packets (both dropped).

            --watch redraws every SECONDS (default 1) with per-second rates until Ctrl-C.

            Examples:
              reuseportctl stats
              reuseportctl stats --service dns --watch 2
              reuseportctl stats --prometheus > /var/lib/node_exporter/textfile/reuseport.prom
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Flag(help: ArgumentHelp("Redraw until interrupted, with rates (--watch SECONDS sets the interval).",
                             valueName: "SECONDS"))
    var watch = false

    @Option(help: ArgumentHelp("Seconds between redraws with --watch.", valueName: "SECONDS"))
    var interval: Double = 1

    @Flag(help: "Print the Prometheus text exposition format.")
    var prometheus = false

    func validate() throws {
        if watch && prometheus { throw ValidationError("--watch and --prometheus do not go together") }
        guard interval.isFinite, interval >= 0.1, interval <= 3600 else {
            throw ValidationError("--watch interval \(interval) is outside 0.1...3600 seconds")
        }
    }

    func run() throws {
        let reader = ServiceReader(root: location.pinDirectory)
        let names = try reader.select(service.service)
        if watch {
            return try StatsWatch(reader: reader, names: names, interval: interval).run()
        }
        let (snapshots, failures) = reader.readEach(names)
        if snapshots.isEmpty, failures.count == 1 { throw failures[0] }
        if prometheus {
            let answer = MetricsExposition.daemonAnswer(runDirectory: location.runDirectory)
            print(MetricsExposition.render(snapshots, daemon: answer.flatMap(MetricsExposition.byService),
                                           daemonVersion: answer?.daemon?.version),
                  terminator: "")
        } else {
            print(snapshots.map { StatsCommand.render($0, previous: nil, seconds: 0) }.joined(separator: "\n"),
                  terminator: "")
        }
        if !failures.isEmpty { throw CtlError.unreadable(failures) }
    }

    /// One service's counters; with `previous` (taken `seconds` earlier), rates too.
    static func render(_ service: ServiceSnapshot, previous: ServiceSnapshot?, seconds: Double) -> String {
        let endpoints = service.listeners.compactMap { $0.endpoint?.description }
        var text = "service \(service.name)\(endpoints.isEmpty ? "" : "  (\(endpoints.joined(separator: ", ")))")\n"
        let rates = previous != nil && seconds > 0
        var columns: [(String, TextTable.Alignment)] = [
            ("SLOT", .right), ("STATE", .left), ("PACKETS", .right), ("BYTES", .right), ("FALLBACKS", .right),
            ("DROPS", .right), ("SHARE", .right),
        ]
        if rates { columns += [("PKT/S", .right), ("BYTES/S", .right)] }
        var table = TextTable(columns)
        let total = service.slots.reduce(into: rp_slot_stats()) { sum, slot in
            sum.packets &+= slot.counters.packets
            sum.bytes &+= slot.counters.bytes
            sum.fallbacks &+= slot.counters.fallbacks
        }
        let before = Dictionary((previous?.slots ?? []).map { ($0.index, $0) }) { first, _ in first }
        func rate(_ now: UInt64, _ then: UInt64?) -> Double {
            guard let then, now >= then else { return 0 }
            return Double(now - then) / seconds
        }
        for slot in service.slots {
            var row = [
                "\(slot.index)", "\(slot.workerState)", "\(slot.counters.packets)", HumanFormat.bytes(slot.counters.bytes),
                "\(slot.counters.fallbacks)", HumanFormat.optional(slot.drops),
                HumanFormat.percent(slot.counters.packets, of: total.packets),
            ]
            if rates {
                let old = before[slot.index]?.counters
                row += [HumanFormat.rate(rate(slot.counters.packets, old?.packets)),
                        HumanFormat.bytes(rate(slot.counters.bytes, old?.bytes)) + "/s"]
            }
            table.add(row)
        }
        let drops = service.slots.compactMap(\.drops)
        var totalRow = ["total", "", "\(total.packets)", HumanFormat.bytes(total.bytes), "\(total.fallbacks)",
                        drops.isEmpty ? "-" : "\(drops.reduce(0, +))", ""]
        if rates, let previous {
            let old = previous.slots.reduce(into: rp_slot_stats()) { sum, slot in
                sum.packets &+= slot.counters.packets
                sum.bytes &+= slot.counters.bytes
            }
            totalRow += [HumanFormat.rate(rate(total.packets, old.packets)),
                         HumanFormat.bytes(rate(total.bytes, old.bytes)) + "/s"]
        }
        table.add(totalRow)
        text += table.render(indent: "  ")
        text += "  global: \(MapDumpCommand.globalSummary(service.global))\n"
        if service.quic != nil {
            text += "  quic: \(MapDumpCommand.quicSummary(service.quicCounters))\n"
            text += "  quic by cid per slot: " + service.slots.map { "\($0.index)=\($0.quic.cid_steered)" }
                .joined(separator: " ") + "\n"
        }
        if let problem = service.diagnosticsProblem { text += "  drops unknown: \(problem)\n" }
        return text
    }
}

/// `stats --watch`: redraws until SIGINT or SIGTERM. The signals are blocked and taken with
/// sigtimedwait(2) as the wait between frames, so an interrupt ends the loop between two
/// reads, never in the middle of one, and the terminal is left clean. This relies on the
/// process having one thread (nothing here starts another): a signal blocked in the only
/// thread stays pending for sigtimedwait.
struct StatsWatch {
    var reader: ServiceReader
    var names: [String]
    var interval: Double

    func run() throws {
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        var previousMask = sigset_t()
        pthread_sigmask(SIG_BLOCK, &signals, &previousMask)
        defer { pthread_sigmask(SIG_SETMASK, &previousMask, nil) }
        let terminal = isatty(1) == 1
        var previous: [String: (snapshot: ServiceSnapshot, at: Double)] = [:]
        while true {
            let (snapshots, failures) = reader.readEach(names)
            let now = MonotonicClock.seconds()
            var frame = terminal ? "\u{1B}[H\u{1B}[2J" : ""
            frame += "every \(HumanFormat.fixed(interval, digits: 1))s, Ctrl-C to stop\n\n"
            frame += snapshots.map { snapshot in
                let old = previous[snapshot.name]
                return StatsCommand.render(snapshot, previous: old?.snapshot, seconds: old.map { now - $0.at } ?? 0)
            }.joined(separator: "\n")
            frame += failures.map { "\n\($0)\n" }.joined()
            print(frame, terminator: terminal ? "" : "\n")
            fflushStandardOutput()
            for snapshot in snapshots { previous[snapshot.name] = (snapshot, now) }
            var timeout = timespec(tv_sec: Int(interval), tv_nsec: Int((interval - interval.rounded(.down)) * 1e9))
            var info = siginfo_t()
            while true {
                let signal = sigtimedwait(&signals, &info, &timeout)
                if signal == SIGINT || signal == SIGTERM { return }
                if signal < 0 && errno == EINTR { continue }
                break  // EAGAIN: the interval passed
            }
        }
    }
}

func fflushStandardOutput() { fflush(nil) }
