import ArgumentParser
import Foundation
import ReuseportControl
import ReuseportKit

/// `map`: the pinned maps, as they are.
struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Show the pinned maps of a service.",
        subcommands: [MapDumpCommand.self],
        defaultSubcommand: MapDumpCommand.self
    )
}

struct MapDumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Every slot of each service: worker, state, counters, socket, drops; buckets and seed.",
        discussion: """
            Reads the maps pinned under --pin-dir (the daemon need not answer) and asks the kernel \
            (sock_diag) about each slot's socket, matched by its cookie, for the receive drops.

            Columns: SLOT index, grouped by GEN (its generation: the working one first, then those \
            draining); PID and STATE of its worker; RESTARTS; IN STATE time since the \
            last state change; BUCKETS of the bucket table that name the slot; PACKETS, BYTES and \
            FALLBACKS steered to it by the program (FALLBACKS: of those, how many came because their \
            own slot was empty); DROPS the kernel dropped at its socket(s); COOKIE of its socket \
            (first listener).

            Examples:
              reuseportctl map dump
              reuseportctl map dump --service dns --json | jq '.services[0].slots[] | {slot, pid}'
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Flag(help: "Print JSON (schema: cli.md in /usr/share/doc/reuseportd, \"version\": \(MapDump.version)).")
    var json = false

    func run() throws {
        let reader = ServiceReader(root: location.pinDirectory)
        let (snapshots, failures) = reader.readEach(try reader.select(service.service))
        if snapshots.isEmpty, failures.count == 1 { throw failures[0] }
        let now = realtimeNanoseconds()
        // What only the daemon knows (which build runs, the upgrade in progress, the workers'
        // STATUS=), if it answers.
        let answer = MetricsExposition.daemonAnswer(runDirectory: location.runDirectory)
        let daemon = answer.flatMap(MetricsExposition.byService) ?? [:]
        if json {
            print(try MapDump(root: location.pinDirectory, services: snapshots, failures: failures, now: now,
                              daemon: daemon, identity: answer?.daemon).encoded())
        } else {
            print(MapDumpCommand.daemonLine(answer?.daemon, socket: location.controlSocket)
                  + snapshots.map { MapDumpCommand.render($0, now: now, daemon: daemon[$0.name]) }.joined(separator: "\n"),
                  terminator: "")
        }
        if !failures.isEmpty { throw CtlError.unreadable(failures) }
    }

    /// Which daemon answered and which build it runs, beside this reuseportctl's, in one line.
    static func daemonLine(_ identity: DaemonIdentity?, socket: String) -> String {
        let cli = "(reuseportctl \(BuildVersion.string))"
        guard let identity else { return "daemon     no answer at \(socket) \(cli)\n\n" }
        return "daemon     pid \(identity.pid), version \(identity.version ?? "unknown (too old to say)") \(cli)\n\n"
    }

    /// The human view of one service; `daemon`: what the daemon's status adds, if it answered.
    static func render(_ service: ServiceSnapshot, now: UInt64, daemon: ServiceStatus? = nil) -> String {
        var text = "service \(service.name)  (\(service.directory))\n"
        text += "  listeners  \(listenerSummary(service))\n"
        let config = service.config
        if config.abi_version == 0 {
            text += "  config     not written yet: the program drops every packet\n"
        } else {
            text += "  seed \(HumanFormat.hex32(config.seed))  buckets \(config.bucket_count)"
                + "  slots \(config.slot_count)  live \(config.live_count)  abi \(config.abi_version)\n"
        }
        text += "  global     \(globalSummary(service.global))\n"
        text += "  change     \(changeSummary(service))\n"
        text += "  generation \(generationSummary(service))\n"
        let shares = GenerationShare.all(service)
        if !shares.isEmpty {
            text += "  shares     " + shares.map(\.text).joined(separator: "; ") + "\n"
        }
        if let upgrade = daemon?.upgrade {
            text += "  upgrade    \(upgradeSummary(upgrade))\n"
        } else if let canary = service.canary {
            text += "  upgrade    \(pinnedCanarySummary(canary, service: service, now: now))\n"
        }
        text += "  flows      \(flowSummary(service))\n"
        if let quic = service.quic {
            text += "  quic       \(quicLayout(quic))\n"
            text += "             \(quicSummary(service.quicCounters))\n"
        }
        if let problem = service.diagnosticsProblem { text += "  drops      unknown: \(problem)\n" }
        var table = TextTable([
            ("SLOT", .right), ("GEN", .right), ("PID", .right), ("STATE", .left), ("RESTARTS", .right), ("IN STATE", .right),
            ("BUCKETS", .right), ("PACKETS", .right), ("BYTES", .right), ("FALLBACKS", .right),
            ("DROPS", .right), ("RECORDS", .right), ("CHANGE", .left), ("COOKIE", .right),
        ])
        for slot in byGeneration(service) {
            let cookie = slot.sockets.first.map { "\($0.cookie)" } ?? "-"
            table.add([
                "\(slot.index)", "\(slot.state.generation)", HumanFormat.optional(slot.pid), "\(slot.workerState)", "\(slot.state.restarts)",
                HumanFormat.duration(slot.secondsInState(now: now)), "\(slot.buckets)", "\(slot.counters.packets)",
                HumanFormat.bytes(slot.counters.bytes), "\(slot.counters.fallbacks)", HumanFormat.optional(slot.drops),
                "\(slot.state.records)", slot.role, cookie,
            ])
        }
        text += "\n" + table.render(indent: "  ")
        for slot in daemon?.slots ?? [] {
            if let status = slot.notifiedStatus { text += "  STATUS=    slot \(slot.slot): \(status)\n" }
        }
        text += healthTable(daemon)
        for worker in daemon?.leaving ?? [] {
            text += "  leaving    pid \(worker.pid), was slot \(worker.slot) of generation \(worker.generation): \(worker.state.rawValue)\n"
        }
        if let quic = service.quic {
            var quicTable = TextTable([("SLOT", .right), ("SERVER ID", .left), ("BY CID", .right),
                                       ("BY DCID HASH", .right)])
            for slot in service.slots {
                quicTable.add(["\(slot.index)", QuicSteering.hex(quic.serverID(slot: slot.index)),
                               "\(slot.quic.cid_steered)", "\(slot.quic.dcid_hashed)"])
            }
            text += "\n  QUIC packets per slot: by the server ID in their connection ID, or (long headers) by the hash of it\n"
            text += quicTable.render(indent: "  ")
        }
        if service.listeners.count > 1 {
            text += "  (DROPS: summed over the \(service.listeners.count) listeners' sockets; COOKIE: listener 0;"
                + " --json has each socket)\n"
        }
        return text
    }

    /// The slots' active health checks, from the daemon's status; empty without them.
    static func healthTable(_ daemon: ServiceStatus?) -> String {
        let slots = (daemon?.slots ?? []).filter { $0.health != nil }
        guard !slots.isEmpty else { return "" }
        var table = TextTable([("SLOT", .right), ("HEALTH", .left), ("PROBES", .right), ("PASSED", .right),
                               ("FAILED", .right), ("UNREACHED", .right), ("RESTARTS", .right), ("FAILOVERS", .right),
                               ("LAST PROBLEM", .left)])
        for slot in slots {
            guard let health = slot.health else { continue }
            table.add(["\(slot.slot)", health.healthy ? "healthy" : "unhealthy", "\(health.probes)", "\(health.passed)",
                       "\(health.failed)", "\(health.unreached)", "\(health.restarts)", "\(health.failovers)",
                       health.lastProblem ?? "-"])
        }
        return "\n  health checks (from the daemon): probes sent through the shared port to each slot\n"
            + table.render(indent: "  ")
    }

    static func listenerSummary(_ service: ServiceSnapshot) -> String {
        if service.listeners.isEmpty { return "none pinned" }
        return service.listeners.map { listener in
            let endpoint = listener.endpoint.map { "\($0)" } ?? "unknown (no socket in its array)"
            return "\(listener.index): \(endpoint)"
        }.joined(separator: ", ")
    }

    /// The placement change in progress: phase, time left, buckets moving.
    static func changeSummary(_ service: ServiceSnapshot) -> String {
        let change = service.transition
        let now = UInt64(MonotonicClock.nanoseconds())
        func left(_ ns: UInt64) -> String { HumanFormat.duration(Double(ns > now ? ns - now : 0) / 1e9) }
        switch change.phase {
        case RP_TRANSITION_LEARNING.rawValue:
            return "learning: \(service.learningBuckets) buckets record their live flows, switch in \(left(change.switch_ns))"
        case RP_TRANSITION_DRAINING.rawValue:
            let deadline = change.drain_deadline_ns == 0 ? "no drain timeout" : "drain timeout in \(left(change.drain_deadline_ns))"
            return "draining: \(service.pinnedBuckets) buckets pinned, recorded flows stay until idle; \(deadline)"
        default:
            return "none"
        }
    }

    /// The slots grouped by generation: the working one first, then the older ones draining,
    /// newest first, then one starting (above the working one's number); by index within each.
    static func byGeneration(_ service: ServiceSnapshot) -> [ServiceSnapshot.Slot] {
        let working = service.transition.working_generation
        return service.slots.sorted {
            let (a, b) = (generationRank($0.state.generation, working: working),
                          generationRank($1.state.generation, working: working))
            return a != b ? a < b : $0.index < $1.index
        }
    }

    static func generationRank(_ generation: UInt32, working: UInt32) -> (Int, UInt32) {
        generation == working ? (0, 0) : generation < working ? (1, working - generation) : (2, generation)
    }

    /// The working generation, those draining and one starting, with their slots and records.
    static func generationSummary(_ service: ServiceSnapshot) -> String {
        let working = service.transition.working_generation
        guard working > 0 else { return "none recorded" }
        // Generation 0 is none: a row never published, or cleared when its slot was removed.
        let groups = Dictionary(grouping: service.slots.filter { $0.state.generation != 0 }, by: \.state.generation)
        var parts: [String] = []
        for generation in groups.keys.sorted(by: { generationRank($0, working: working) < generationRank($1, working: working) }) {
            let slots = groups[generation]!.map(\.index).sorted().map(String.init).joined(separator: ",")
            let role = generation == working ? "working" : generation < working ? "draining" : "starting"
            let records = groups[generation]!.reduce(0) { $0 + Int($1.state.records) }
            parts.append("\(generation) \(role) (slots \(slots)\(role == "draining" ? ", \(records) records" : ""))")
        }
        return (parts.isEmpty ? ["\(working) working"] : parts).joined(separator: "  ")
            + "  last \(service.transition.last_generation)"
    }

    /// The daemon's upgrade in progress, or its last one, in one line.
    static func upgradeSummary(_ upgrade: UpgradeStatus) -> String {
        let slots = upgrade.slots.map(String.init).joined(separator: ",")
        let what = upgrade.rollback == true ? "roll back to generation" : "generation"
        var text = "\(what) \(upgrade.generation) \(upgrade.phase.rawValue) (from \(upgrade.previous), slots \(slots))"
        if let percent = upgrade.canaryPercent {
            text += "; canary \(percent)%" + (upgrade.canaryBuckets.map { " = \($0) buckets" } ?? "")
            if upgrade.phase == .canary {
                let now = WallClock.nanoseconds()
                text += upgrade.bakeEndsNs.map { ", bake ends in \(HumanFormat.duration(Double($0 > now ? $0 - now : 0) / 1e9))" }
                    ?? ", learning its live flows"
            }
            if let comparison = upgrade.comparison { text += "; \(comparison)" }
        }
        return text + (upgrade.reason.map { ": \($0)" } ?? "")
    }

    /// A canary as the daemon pinned it for the next one (rp_canary), when no daemon tells more.
    static func pinnedCanarySummary(_ canary: PinnedCanary, service: ServiceSnapshot, now: UInt64) -> String {
        let slots = service.slots.filter { $0.state.generation == canary.generation }.map { String($0.index) }
        let bake = canary.bakeEndsWallNs.map {
            ", bake ends in \(HumanFormat.duration(Double($0 > now ? $0 - now : 0) / 1e9))"
        } ?? (canary.phase == .learning ? ", learning its live flows" : ", bake not begun")
        return "generation \(canary.generation) canary (from \(canary.previous), slots \(slots.joined(separator: ","))"
            + "; pinned, no daemon answers); canary \(canary.percent)% = \(canary.original.count) buckets\(bake)"
            + (canary.phase == .gate ? "; the gate was running" : "")
    }

    /// Flow records and what could not be recorded.
    static func flowSummary(_ service: ServiceSnapshot) -> String {
        let flows = service.flows
        let memory = HumanFormat.bytes(UInt64(service.records * FlowRecords.bytesPerRecord))
        return "records \(service.records) of \(service.trackedCapacity) (about \(memory))  recorded \(flows.recorded)"
            + "  untracked \(flows.untracked)  untracked_uncounted \(flows.untracked_uncounted)"
            + "  rate_refused \(flows.rate_refused)  pinned \(flows.pinned)  stale \(flows.stale)"
    }

    /// The QUIC-LB layout in one line.
    static func quicLayout(_ quic: QuicSteering) -> String {
        "cid_length \(quic.cidLength)  server_id_length \(quic.serverIDLength)"
            + "  host_prefix \(quic.hostPrefix.isEmpty ? "-" : QuicSteering.hex(quic.hostPrefix))"
            + "  config_rotation \(quic.configRotation)"
    }

    static func quicSummary(_ counters: rp_quic_stats) -> String {
        "cid_steered \(counters.cid_steered)  initials \(counters.initials)  dcid_hashed \(counters.dcid_hashed)"
            + "  unknown_cid \(counters.unknown_cid)  fallbacks \(counters.fallbacks)"
            + "  version_negotiation \(counters.version_negotiation)  unparsable \(counters.unparsable)"
    }

    static func globalSummary(_ global: rp_global_stats) -> String {
        "dropped_no_slot \(global.dropped_no_slot)  unparsable \(global.unparsable)"
            + "  fallbacks \(global.fallbacks)  select_errors \(global.select_errors)"
            + "  migrated \(global.migrated)  migrate_failed \(global.migrate_failed)"
    }
}

/// `map dump --json`. The schema is documented in docs/cli.md; `version` changes only when a
/// field changes meaning or goes away (new fields may be added without a new version).
struct MapDump: Encodable {
    static let version = 1

    struct Service: Encodable {
        var name: String
        var pinDirectory: String
        var abiVersion: UInt32
        var seed: UInt32
        var bucketCount: UInt32
        var slotCount: UInt32
        var liveCount: UInt32
        var listeners: [Listener]
        var global: Global
        var slots: [Slot]
        var change: Change
        /// QUIC connection-ID steering: null when off.
        @Nullable var quic: Quic?
        @Nullable var socketDiagnosticsError: String?
        /// The daemon's upgrade in progress or its last one; null when the daemon does not answer.
        @Nullable var upgrade: UpgradeStatus?
        /// Per generation: its slots, its share of the buckets and its live recorded flows.
        var generations: [GenerationShare]
        /// The canary the pins record (rp_canary) while it learns or bakes; null without one.
        @Nullable var pinnedCanary: PinnedCanaryState?
    }

    /// rp_canary: what `map dump`'s `upgrade` line shows while no daemon answers.
    struct PinnedCanaryState: Encodable {
        /// "learning", "baking" or "gate".
        var phase: String
        var generation: UInt32
        var previous: UInt32
        var slots: [UInt32]
        var percent: Int
        var buckets: Int
        var bakeMs: Int
        /// CLOCK_REALTIME; null before the bake began.
        @Nullable var bakeEndsNs: UInt64?
        @Nullable var bakeSecondsLeft: Double?
        /// The service has a canary_gate.
        var gated: Bool
        /// The gate was running (phase "gate").
        var gateRunning: Bool
    }

    struct Quic: Encodable {
        var cidLength: Int
        var serverIdLength: Int
        var hostPrefix: String
        var configRotation: Int
        var cidSteered: UInt64
        var initials: UInt64
        var dcidHashed: UInt64
        var unknownCid: UInt64
        var fallbacks: UInt64
        var versionNegotiation: UInt64
        var unparsable: UInt64
    }

    struct SlotQuic: Encodable {
        var serverId: String
        var cidSteered: UInt64
        var dcidHashed: UInt64
    }

    /// The placement change in progress and the flow-tracking counters.
    struct Change: Encodable {
        /// "none", "learning" or "draining".
        var phase: String
        var learningBuckets: Int
        var pinnedBuckets: Int
        @Nullable var switchNs: UInt64?
        @Nullable var drainDeadlineNs: UInt64?
        var records: Int
        var maxTrackedFlows: UInt32
        var recordBytes: Int
        var recorded: UInt64
        var untracked: UInt64
        var untrackedUncounted: UInt64
        var rateRefused: UInt64
        var pinned: UInt64
        var stale: UInt64
        /// The generation taking new flows, and the last number given out (0: none recorded).
        var workingGeneration: UInt32
        var lastGeneration: UInt32
    }

    struct Listener: Encodable {
        var index: Int
        @Nullable var endpoint: String?
        var liveSlots: [UInt32]
    }

    struct Global: Encodable {
        var droppedNoSlot: UInt64
        var unparsable: UInt64
        var fallbacks: UInt64
        var selectErrors: UInt64
        var migrated: UInt64
        var migrateFailed: UInt64
    }

    struct Slot: Encodable {
        var slot: UInt32
        @Nullable var pid: UInt32?
        var state: String
        var restarts: UInt32
        var stalls: UInt32
        var watchdogRestarts: UInt32
        var generation: UInt32
        var sinceNs: UInt64
        @Nullable var secondsInState: Double?
        var buckets: Int
        var packets: UInt64
        var bytes: UInt64
        var fallbacks: UInt64
        @Nullable var receiveDrops: UInt64?
        var records: UInt32
        var leaving: Bool
        var joining: Bool
        var sockets: [Socket]
        @Nullable var quic: SlotQuic?
        /// The worker's last `STATUS=` (from the daemon; null when it does not answer or none came).
        @Nullable var notifiedStatus: String?
        /// The slot's active health checks (from the daemon; null without them or without an answer).
        @Nullable var health: SlotHealthStatus?
    }

    struct Socket: Encodable {
        var listener: Int
        var cookie: UInt64
        @Nullable var inode: UInt64?
        @Nullable var receiveDrops: UInt64?
        @Nullable var receiveQueue: UInt64?
    }

    struct Failure: Encodable {
        var error: String
    }

    /// The daemon that answered: its pid, when its image started and the build it runs.
    struct Daemon: Encodable {
        var pid: Int32
        var startedAtNs: UInt64
        /// Null for a daemon too old to say.
        @Nullable var version: String?
    }

    var version = MapDump.version
    var pinDir: String
    var nowNs: UInt64
    var services: [Service]
    /// Services found under the pin folder whose maps could not be read.
    var errors: [Failure]
    /// Null when the daemon does not answer.
    @Nullable var daemon: Daemon?
    var reuseportctlVersion = BuildVersion.string

    init(root: String, services: [ServiceSnapshot], failures: [CtlError], now: UInt64,
         daemon: MetricsExposition.DaemonStatus = [:], identity: DaemonIdentity? = nil) {
        pinDir = root
        nowNs = now
        self.daemon = identity.map { Daemon(pid: $0.pid, startedAtNs: $0.startedAtNs, version: $0.version) }
        errors = failures.map { Failure(error: $0.description) }
        self.services = services.map { service in
            let status = daemon[service.name]
            return Service(
                name: service.name, pinDirectory: service.directory, abiVersion: service.config.abi_version,
                seed: service.config.seed, bucketCount: service.config.bucket_count,
                slotCount: service.config.slot_count, liveCount: service.config.live_count,
                listeners: service.listeners.map {
                    Listener(index: $0.index, endpoint: $0.endpoint?.description, liveSlots: $0.cookies.keys.sorted())
                },
                global: Global(droppedNoSlot: service.global.dropped_no_slot, unparsable: service.global.unparsable,
                               fallbacks: service.global.fallbacks, selectErrors: service.global.select_errors,
                               migrated: service.global.migrated, migrateFailed: service.global.migrate_failed),
                slots: service.slots.map { slot in
                    Slot(slot: slot.index, pid: slot.pid, state: "\(slot.workerState)", restarts: slot.state.restarts,
                         stalls: slot.state.stalls, watchdogRestarts: slot.state.watchdog_restarts,
                         generation: slot.state.generation, sinceNs: slot.state.since_ns,
                         secondsInState: slot.secondsInState(now: now).map { ($0 * 1000).rounded() / 1000 },
                         buckets: slot.buckets, packets: slot.counters.packets, bytes: slot.counters.bytes,
                         fallbacks: slot.counters.fallbacks, receiveDrops: slot.drops, records: slot.state.records,
                         leaving: slot.isLeaving, joining: slot.isJoining,
                         sockets: slot.sockets.map {
                             Socket(listener: $0.listener, cookie: $0.cookie, inode: $0.diagnosis?.inode,
                                    receiveDrops: $0.diagnosis?.drops, receiveQueue: $0.diagnosis?.receiveQueue)
                         },
                         quic: service.quic.map {
                             SlotQuic(serverId: QuicSteering.hex($0.serverID(slot: slot.index)),
                                      cidSteered: slot.quic.cid_steered, dcidHashed: slot.quic.dcid_hashed)
                         },
                         notifiedStatus: status?.slots.first { $0.slot == slot.index }?.notifiedStatus,
                         health: status?.slots.first { $0.slot == slot.index }?.health)
                },
                change: Change(service),
                quic: service.quic.map { quic in
                    let counters = service.quicCounters
                    return Quic(cidLength: quic.cidLength, serverIdLength: quic.serverIDLength,
                                hostPrefix: QuicSteering.hex(quic.hostPrefix), configRotation: quic.configRotation,
                                cidSteered: counters.cid_steered, initials: counters.initials,
                                dcidHashed: counters.dcid_hashed, unknownCid: counters.unknown_cid,
                                fallbacks: counters.fallbacks, versionNegotiation: counters.version_negotiation,
                                unparsable: counters.unparsable)
                },
                socketDiagnosticsError: service.diagnosticsProblem, upgrade: status?.upgrade,
                generations: GenerationShare.all(service),
                pinnedCanary: service.canary.map { PinnedCanaryState($0, service: service, now: now) })
        }
    }

    func encoded() throws -> String {
        try JSONOutput.string(self)
    }
}

/// Every --json output: snake_case keys, sorted, pretty-printed; absent values are null.
enum JSONOutput {
    static func string<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}

/// An optional that is written as `null` when absent (synthesized Encodable would drop the
/// key): every documented key is always there.
@propertyWrapper
struct Nullable<Value: Encodable>: Encodable {
    var wrappedValue: Value?

    init(wrappedValue: Value?) { self.wrappedValue = wrappedValue }

    func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        if let wrappedValue { try container.encode(wrappedValue) } else { try container.encodeNil() }
    }
}

extension MapDump.Change {
    init(_ service: ServiceSnapshot) {
        let change = service.transition
        switch change.phase {
        case RP_TRANSITION_LEARNING.rawValue: phase = "learning"
        case RP_TRANSITION_DRAINING.rawValue: phase = "draining"
        default: phase = "none"
        }
        learningBuckets = service.learningBuckets
        pinnedBuckets = service.pinnedBuckets
        switchNs = change.switch_ns == 0 ? nil : change.switch_ns
        drainDeadlineNs = change.drain_deadline_ns == 0 ? nil : change.drain_deadline_ns
        records = service.records
        maxTrackedFlows = service.trackedCapacity
        recordBytes = service.records * FlowRecords.bytesPerRecord
        recorded = service.flows.recorded
        untracked = service.flows.untracked
        untrackedUncounted = service.flows.untracked_uncounted
        rateRefused = service.flows.rate_refused
        pinned = service.flows.pinned
        stale = service.flows.stale
        workingGeneration = change.working_generation
        lastGeneration = change.last_generation
    }
}

extension MapDump.PinnedCanaryState {
    init(_ canary: PinnedCanary, service: ServiceSnapshot, now: UInt64) {
        switch canary.phase {
        case .learning: phase = "learning"
        case .baking: phase = "baking"
        case .gate: phase = "gate"
        }
        generation = canary.generation
        previous = canary.previous
        slots = service.slots.filter { $0.state.generation == canary.generation }.map(\.index).sorted()
        percent = canary.percent
        buckets = canary.original.count
        bakeMs = canary.bakeMs
        bakeEndsNs = canary.bakeEndsWallNs
        bakeSecondsLeft = canary.bakeEndsWallNs.map { (Double($0 > now ? $0 - now : 0) / 1e6).rounded() / 1000 }
        gated = canary.gated
        gateRunning = canary.phase == .gate
    }
}

/// One generation's part of a service, from the pins: its slots, the buckets that name them
/// and the live flows recorded for them (the slots' records, swept while a change runs; 0
/// when none runs).
struct GenerationShare: Equatable, Encodable {
    var generation: UInt32
    /// "working", "canary", "draining" or "starting".
    var role: String
    var slots: [UInt32]
    var buckets: Int
    var flows: Int
    /// The table's size, for the share: not written to the JSON.
    var bucketCount: Int

    private enum CodingKeys: String, CodingKey { case generation, role, slots, buckets, flows }

    var text: String {
        "generation \(generation) \(buckets) buckets ("
            + String(format: "%.1f", Double(buckets) * 100 / Double(max(bucketCount, 1))) + "%), \(flows) flows"
    }

    /// Every generation with a slot (generation 0, none, left out), the working one first, as
    /// `map dump` groups them; empty while no generation is recorded.
    static func all(_ service: ServiceSnapshot) -> [GenerationShare] {
        let working = service.transition.working_generation
        guard working > 0 else { return [] }
        let groups = Dictionary(grouping: service.slots.filter { $0.state.generation != 0 }, by: \.state.generation)
        let total = Int(service.config.bucket_count)
        return groups.keys.sorted {
            MapDumpCommand.generationRank($0, working: working) < MapDumpCommand.generationRank($1, working: working)
        }.map { generation in
            let slots = groups[generation]!
            return GenerationShare(
                generation: generation,
                role: generation == working ? "working" : generation == service.canary?.generation ? "canary"
                    : generation < working ? "draining" : "starting",
                slots: slots.map(\.index).sorted(), buckets: slots.reduce(0) { $0 + $1.buckets },
                flows: slots.reduce(0) { $0 + Int($1.state.records) }, bucketCount: total)
        }
    }
}
