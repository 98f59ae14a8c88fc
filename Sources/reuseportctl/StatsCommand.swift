#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
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
            unparsable, fallbacks, select_errors.

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
            print(PrometheusExposition.render(snapshots), terminator: "")
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
        if let problem = service.diagnosticsProblem { text += "  drops unknown: \(problem)\n" }
        return text
    }
}

/// `stats --watch`: redraws until SIGINT or SIGTERM. The signals are blocked and taken with
/// sigtimedwait(2) as the wait between frames, so an interrupt ends the loop between two
/// reads, never in the middle of one, and the terminal is left clean.
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
            let now = monotonicSeconds()
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

func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

func fflushStandardOutput() { fflush(nil) }

/// The Prometheus text exposition format (version 0.0.4) of every service's counters.
enum PrometheusExposition {
    struct Family {
        var name: String
        var type: String
        var help: String
        var samples: [(labels: [(String, String)], value: String)] = []
    }

    static func render(_ services: [ServiceSnapshot]) -> String {
        var families: [Family] = []
        func family(_ name: String, _ type: String, _ help: String,
                    _ samples: (ServiceSnapshot) -> [([(String, String)], String)]) {
            var family = Family(name: name, type: type, help: help)
            for service in services {
                family.samples += samples(service).map { (labels: [("service", service.name)] + $0.0, value: $0.1) }
            }
            families.append(family)
        }
        func perSlot(_ value: @escaping (ServiceSnapshot.Slot) -> UInt64?) -> (ServiceSnapshot) -> [([(String, String)], String)] {
            { service in service.slots.compactMap { slot in value(slot).map { ([("slot", "\(slot.index)")], "\($0)") } } }
        }
        family("reuseport_slot_packets_total", "counter",
               "Datagrams (UDP) or connection requests (TCP) the program steered to the slot.",
               perSlot { $0.counters.packets })
        family("reuseport_slot_bytes_total", "counter", "UDP payload bytes the program steered to the slot.",
               perSlot { $0.counters.bytes })
        family("reuseport_slot_fallbacks_total", "counter",
               "Packets steered to the slot because their own slot had no socket.", perSlot { $0.counters.fallbacks })
        family("reuseport_slot_receive_drops_total", "counter",
               "Packets the kernel dropped at the slot's socket (sk_drops), per listener.") { service in
            service.slots.flatMap { slot in
                slot.sockets.compactMap { socket in
                    socket.diagnosis?.drops.map {
                        ([("slot", "\(slot.index)"), ("listener", "\(socket.listener)")], "\($0)")
                    }
                }
            }
        }
        family("reuseport_slot_buckets", "gauge", "Entries of the bucket table that name the slot.",
               perSlot { UInt64($0.buckets) })
        family("reuseport_slot_worker_restarts_total", "counter", "Worker starts after the first, per slot.",
               perSlot { UInt64($0.state.restarts) })
        family("reuseport_slot_state", "gauge", "The slot's worker state (1 for the current state).") { service in
            service.slots.flatMap { slot in
                WorkerState.all.map { state in
                    ([("slot", "\(slot.index)"), ("state", "\(state)")], slot.workerState == state ? "1" : "0")
                }
            }
        }
        family("reuseport_slot_socket_up", "gauge", "1 if the slot has a socket in the listener's array.") { service in
            service.slots.flatMap { slot in
                service.listeners.map { listener in
                    ([("slot", "\(slot.index)"), ("listener", "\(listener.index)")],
                     listener.cookies[slot.index] == nil ? "0" : "1")
                }
            }
        }
        family("reuseport_slots", "gauge", "Slots configured (rp_config.slot_count).") { [([], "\($0.config.slot_count)")] }
        family("reuseport_buckets", "gauge", "Entries of the bucket table in use.") { [([], "\($0.config.bucket_count)")] }
        let global: [(String, String, (rp_global_stats) -> UInt64)] = [
            ("reuseport_dropped_no_slot_total", "Packets dropped because no slot had a socket (or no configuration).",
             { $0.dropped_no_slot }),
            ("reuseport_unparsable_total", "Packets the program could not parse (dropped).", { $0.unparsable }),
            ("reuseport_fallbacks_total", "Packets whose slot had no socket, sent to a live one.", { $0.fallbacks }),
            ("reuseport_select_errors_total", "bpf_sk_select_reuseport() failures other than an empty slot.",
             { $0.select_errors }),
        ]
        for (name, help, value) in global {
            family(name, "counter", help) { [([], "\(value($0.global))")] }
        }
        return families.filter { !$0.samples.isEmpty }.map { family in
            var text = "# HELP \(family.name) \(family.help)\n# TYPE \(family.name) \(family.type)\n"
            for sample in family.samples {
                let labels = sample.labels.map { "\($0.0)=\"\(escaped($0.1))\"" }.joined(separator: ",")
                text += "\(family.name){\(labels)} \(sample.value)\n"
            }
            return text
        }.joined()
    }

    /// Label values escape backslash, double quote and newline.
    static func escaped(_ value: String) -> String {
        var text = ""
        for character in value {
            switch character {
            case "\\": text += "\\\\"
            case "\"": text += "\\\""
            case "\n": text += "\\n"
            default: text.append(character)
            }
        }
        return text
    }
}
