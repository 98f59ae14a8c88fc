import Prometheus
import ReuseportControl
import ReuseportKit

/// The one place that turns snapshots of the pins (and, when the daemon answered, its status)
/// into a Prometheus registry: `stats --prometheus` prints it, `serve-metrics` serves it. A
/// fresh registry per read: every value is set from the maps, none is counted here.
enum MetricsExposition {
    /// What the daemon counts that the maps do not hold, by service name.
    typealias DaemonStatus = [String: ServiceStatus]

    /// The text exposition format (0.0.4) of `services`.
    static func render(_ services: [ServiceSnapshot], daemon: DaemonStatus? = nil, daemonVersion: String? = nil,
                       unreadable: Int? = nil) -> String {
        registry(services, daemon: daemon, daemonVersion: daemonVersion, unreadable: unreadable).emitToString()
    }

    /// The daemon's status, if its control socket answers within a second; nil otherwise (no
    /// daemon, or not root): the maps' metrics do not depend on it.
    static func daemonStatus(runDirectory: String) -> DaemonStatus? {
        daemonAnswer(runDirectory: runDirectory).flatMap(byService)
    }

    /// The daemon's whole status answer (its identity too), on the same terms.
    static func daemonAnswer(runDirectory: String) -> ControlResponse? {
        let client = ControlClient(runDirectory: runDirectory, timeoutSeconds: 1)
        return try? client.perform(ControlRequest(command: .status))
    }

    static func byService(_ answer: ControlResponse) -> DaemonStatus? {
        guard let services = answer.services else { return nil }
        return Dictionary(services.map { ($0.name, $0) }) { first, _ in first }
    }

    static func registry(_ services: [ServiceSnapshot], daemon: DaemonStatus? = nil, daemonVersion: String? = nil,
                         unreadable: Int? = nil) -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        let builder = Builder(registry: registry)
        builder.addBuild("reuseportctl", BuildVersion.string)
        if let daemonVersion { builder.addBuild("reuseportd", daemonVersion) }
        for service in services {
            builder.add(service)
            if let status = daemon?[service.name] { builder.add(status, of: service.name) }
        }
        if let unreadable { builder.gauge(.unreadableServices, [], UInt64(unreadable)) }
        return registry
    }

    /// The commit of a version string as `make` writes it (`0.1.0~gitDATE.COMMIT`, `-dirty`
    /// kept); "unknown" when the version does not have that form (a build without make).
    static func commit(of version: String) -> String {
        guard version.contains("~git"), let dot = version.lastIndex(of: ".") else { return "unknown" }
        return String(version[version.index(after: dot)...])
    }

    private struct Builder {
        let registry: PrometheusCollectorRegistry

        /// Our names are whole (unit suffix included), as docs/cli.md lists them.
        private func descriptor(_ family: MetricFamily) -> MetricNameDescriptor {
            MetricNameDescriptor(metricName: family.rawValue, unitName: "", helpText: family.help)
        }

        func counter(_ family: MetricFamily, _ labels: [(String, String)], _ value: UInt64) {
            precondition(family.kind == .counter && labels.map(\.0) == family.labels, "\(family) as registered")
            registry.makeCounter(descriptor: descriptor(family), labels: labels).increment(by: Int64(clamping: value))
        }

        func gauge(_ family: MetricFamily, _ labels: [(String, String)], _ value: UInt64) {
            precondition(family.kind == .gauge && labels.map(\.0) == family.labels, "\(family) as registered")
            registry.makeGauge(descriptor: descriptor(family), labels: labels).set(Int64(clamping: value))
        }

        /// `reuseport_build_info`: 1, with the binary's version and commit as labels (the usual
        /// Prometheus way to join a build to the other series).
        func addBuild(_ binary: String, _ version: String) {
            let commit = MetricsExposition.commit(of: version)
            gauge(.buildInfo, [("binary", binary), ("version", version), ("commit", commit)], 1)
        }

        func add(_ service: ServiceSnapshot) {
            let name = ("service", service.name)
            for slot in service.slots {
                let labels = [name, ("slot", "\(slot.index)")]
                counter(.slotPacketsTotal,
                        labels, slot.counters.packets)
                counter(.slotBytesTotal,
                        labels, slot.counters.bytes)
                counter(.slotFallbacksTotal, labels, slot.counters.fallbacks)
                for socket in slot.sockets {
                    guard let drops = socket.diagnosis?.drops else { continue }
                    counter(.slotReceiveDropsTotal,
                            labels + [("listener", "\(socket.listener)")], drops)
                }
                gauge(.slotBuckets, labels, UInt64(slot.buckets))
                counter(.slotWorkerRestartsTotal, labels, UInt64(slot.state.restarts))
                counter(.slotStallsTotal,
                        labels, UInt64(slot.state.stalls))
                gauge(.slotFlowRecords, labels, UInt64(slot.state.records))
                gauge(.slotLeaving, labels, slot.isLeaving ? 1 : 0)
                gauge(.slotGeneration, labels, UInt64(slot.state.generation))
                counter(.slotWatchdogRestartsTotal, labels, UInt64(slot.state.watchdog_restarts))
                for state in WorkerState.all {
                    gauge(.slotState,
                          labels + [("state", "\(state)")], slot.workerState == state ? 1 : 0)
                }
                if service.quic != nil {
                    counter(.slotQuicCidSteeredTotal, labels, slot.quic.cid_steered)
                    counter(.slotQuicDcidHashedTotal, labels, slot.quic.dcid_hashed)
                }
                for listener in service.listeners {
                    gauge(.slotSocketUp,
                          labels + [("listener", "\(listener.index)")], listener.cookies[slot.index] == nil ? 0 : 1)
                }
            }
            gauge(.slots, [name], UInt64(service.config.slot_count))
            gauge(.liveSlots, [name], UInt64(service.config.live_count))
            gauge(.buckets, [name], UInt64(service.config.bucket_count))
            let global = service.global
            counter(.droppedNoSlotTotal, [name], global.dropped_no_slot)
            counter(.unparsableTotal, [name], global.unparsable)
            counter(.fallbacksTotal, [name], global.fallbacks)
            counter(.selectErrorsTotal,
                    [name], global.select_errors)
            counter(.tcpMigratedTotal, [name], global.migrated)
            counter(.tcpMigrateFailedTotal, [name], global.migrate_failed)
            let flows = service.flows
            counter(.flowRecordsCreatedTotal, [name], flows.recorded)
            counter(.flowsUntrackedTotal, [name], flows.untracked)
            counter(.flowsUntrackedUncountedTotal, [name], flows.untracked_uncounted)
            counter(.flowRecordsRateRefusedTotal, [name], flows.rate_refused)
            counter(.flowPinnedPacketsTotal, [name], flows.pinned)
            counter(.flowStalePacketsTotal, [name], flows.stale)
            gauge(.flowRecords, [name], UInt64(service.records))
            gauge(.flowRecordsCapacity, [name], UInt64(service.trackedCapacity))
            gauge(.placementChangePhase, [name], UInt64(service.transition.phase))
            gauge(.workingGeneration, [name], UInt64(service.transition.working_generation))
            gauge(.lastGeneration, [name], UInt64(service.transition.last_generation))
            for share in GenerationShare.all(service) {
                gauge(.generationFlows, [name, ("generation", "\(share.generation)")], UInt64(share.flows))
            }
            if service.quic != nil { addQuic(service.quicCounters, [name]) }
        }

        /// The service's QUIC counters (rp_quic_stats), when it steers QUIC by connection ID.
        func addQuic(_ quic: rp_quic_stats, _ labels: [(String, String)]) {
            let counters: [(MetricFamily, UInt64)] = [
                (.quicCidSteeredTotal, quic.cid_steered),
                (.quicInitialsTotal, quic.initials),
                (.quicDcidHashedTotal, quic.dcid_hashed),
                (.quicUnknownCidTotal, quic.unknown_cid),
                (.quicFallbacksTotal, quic.fallbacks),
                (.quicVersionNegotiationTotal, quic.version_negotiation),
                (.quicUnparsableTotal, quic.unparsable),
            ]
            for (family, value) in counters { counter(family, labels, value) }
        }

        /// The daemon's own counters (since it started): absent from an older daemon's answer.
        func add(_ status: ServiceStatus, of service: String) {
            let name = ("service", service)
            let perService: [(MetricFamily, Int?)] = [
                (.failoversTotal, status.failovers),
                (.rescueStartsTotal, status.rescueStarts),
                (.removedSlotDropsTotal, status.removedSlotDrops),
                (.upgradesStartedTotal, status.upgrades?.started),
                (.upgradesSwitchedTotal, status.upgrades?.switched),
                (.upgradesAbandonedTotal, status.upgrades?.abandoned),
            ]
            for (family, value) in perService {
                if let value { counter(family, [name], UInt64(clamping: value)) }
            }
            if let upgrade = status.upgrade, upgrade.phase == .canary {
                let labels = [name, ("generation", "\(upgrade.generation)")]
                gauge(.canaryBuckets, labels, UInt64(clamping: upgrade.canaryBuckets ?? 0))
                let now = WallClock.nanoseconds()
                gauge(.canaryBakeSecondsLeft, labels,
                      upgrade.bakeEndsNs.map { $0 > now ? ($0 - now) / 1_000_000_000 : 0 } ?? 0)
                for traffic in upgrade.bakeTraffic ?? [] {
                    let labels = [name, ("generation", "\(traffic.generation)")]
                    gauge(.canaryPackets, labels, traffic.packets)
                    gauge(.canaryReceiveDrops, labels, traffic.drops)
                }
            }
            for slot in status.slots {
                let labels = [name, ("slot", "\(slot.slot)")]
                if let lines = slot.droppedOutputLines {
                    counter(.slotDroppedOutputLinesTotal, labels, UInt64(clamping: lines))
                }
                if let bytes = slot.droppedOutputBytes {
                    counter(.slotDroppedOutputBytesTotal, labels, UInt64(clamping: bytes))
                }
                if let health = slot.health { add(health, labels) }
            }
        }

        /// A slot's active health checks ([service.health_check]).
        func add(_ health: SlotHealthStatus, _ labels: [(String, String)]) {
            let counters: [(MetricFamily, Int)] = [
                (.slotHealthProbesPassedTotal, health.passed),
                (.slotHealthProbesFailedTotal, health.failed),
                (.slotHealthProbesUnreachedTotal, health.unreached),
                (.slotHealthProbesUnaddressableTotal, health.unaddressable),
                (.slotHealthRestartsTotal, health.restarts),
                (.slotHealthFailoversTotal, health.failovers),
            ]
            for (family, value) in counters { counter(family, labels, UInt64(clamping: value)) }
            gauge(.slotHealthy, labels, health.healthy ? 1 : 0)
            gauge(.slotHealthConsecutiveFailures, labels, UInt64(clamping: health.consecutiveFailures))
        }
    }
}

/// Every metric family reuseportctl emits (`stats --prometheus`, `serve-metrics`): its name, type,
/// labels and help. The builder below can emit nothing else, and MetricDocsTests holds the tables of
/// docs/cli.md to this list, types and labels included.
enum MetricFamily: String, CaseIterable, Sendable {
    case buildInfo = "reuseport_build_info"
    case slotPacketsTotal = "reuseport_slot_packets_total"
    case slotBytesTotal = "reuseport_slot_bytes_total"
    case slotFallbacksTotal = "reuseport_slot_fallbacks_total"
    case slotReceiveDropsTotal = "reuseport_slot_receive_drops_total"
    case slotBuckets = "reuseport_slot_buckets"
    case slotWorkerRestartsTotal = "reuseport_slot_worker_restarts_total"
    case slotStallsTotal = "reuseport_slot_stalls_total"
    case slotFlowRecords = "reuseport_slot_flow_records"
    case slotLeaving = "reuseport_slot_leaving"
    case slotGeneration = "reuseport_slot_generation"
    case slotWatchdogRestartsTotal = "reuseport_slot_watchdog_restarts_total"
    case slotState = "reuseport_slot_state"
    case slotQuicCidSteeredTotal = "reuseport_slot_quic_cid_steered_total"
    case slotQuicDcidHashedTotal = "reuseport_slot_quic_dcid_hashed_total"
    case slotSocketUp = "reuseport_slot_socket_up"
    case slots = "reuseport_slots"
    case liveSlots = "reuseport_live_slots"
    case buckets = "reuseport_buckets"
    case droppedNoSlotTotal = "reuseport_dropped_no_slot_total"
    case unparsableTotal = "reuseport_unparsable_total"
    case fallbacksTotal = "reuseport_fallbacks_total"
    case selectErrorsTotal = "reuseport_select_errors_total"
    case tcpMigratedTotal = "reuseport_tcp_migrated_total"
    case tcpMigrateFailedTotal = "reuseport_tcp_migrate_failed_total"
    case flowRecordsCreatedTotal = "reuseport_flow_records_created_total"
    case flowsUntrackedTotal = "reuseport_flows_untracked_total"
    case flowsUntrackedUncountedTotal = "reuseport_flows_untracked_uncounted_total"
    case flowRecordsRateRefusedTotal = "reuseport_flow_records_rate_refused_total"
    case flowPinnedPacketsTotal = "reuseport_flow_pinned_packets_total"
    case flowStalePacketsTotal = "reuseport_flow_stale_packets_total"
    case flowRecords = "reuseport_flow_records"
    case flowRecordsCapacity = "reuseport_flow_records_capacity"
    case placementChangePhase = "reuseport_placement_change_phase"
    case workingGeneration = "reuseport_working_generation"
    case lastGeneration = "reuseport_last_generation"
    case generationFlows = "reuseport_generation_flows"
    case slotDroppedOutputLinesTotal = "reuseport_slot_dropped_output_lines_total"
    case slotDroppedOutputBytesTotal = "reuseport_slot_dropped_output_bytes_total"
    case unreadableServices = "reuseport_unreadable_services"
    case quicCidSteeredTotal = "reuseport_quic_cid_steered_total"
    case quicInitialsTotal = "reuseport_quic_initials_total"
    case quicDcidHashedTotal = "reuseport_quic_dcid_hashed_total"
    case quicUnknownCidTotal = "reuseport_quic_unknown_cid_total"
    case quicFallbacksTotal = "reuseport_quic_fallbacks_total"
    case quicVersionNegotiationTotal = "reuseport_quic_version_negotiation_total"
    case quicUnparsableTotal = "reuseport_quic_unparsable_total"
    case failoversTotal = "reuseport_failovers_total"
    case rescueStartsTotal = "reuseport_rescue_starts_total"
    case removedSlotDropsTotal = "reuseport_removed_slot_drops_total"
    case upgradesStartedTotal = "reuseport_upgrades_started_total"
    case upgradesSwitchedTotal = "reuseport_upgrades_switched_total"
    case upgradesAbandonedTotal = "reuseport_upgrades_abandoned_total"
    case canaryBuckets = "reuseport_canary_buckets"
    case canaryBakeSecondsLeft = "reuseport_canary_bake_seconds_left"
    case canaryPackets = "reuseport_canary_packets"
    case canaryReceiveDrops = "reuseport_canary_receive_drops"
    case slotHealthProbesPassedTotal = "reuseport_slot_health_probes_passed_total"
    case slotHealthProbesFailedTotal = "reuseport_slot_health_probes_failed_total"
    case slotHealthProbesUnreachedTotal = "reuseport_slot_health_probes_unreached_total"
    case slotHealthProbesUnaddressableTotal = "reuseport_slot_health_probes_unaddressable_total"
    case slotHealthRestartsTotal = "reuseport_slot_health_restarts_total"
    case slotHealthFailoversTotal = "reuseport_slot_health_failovers_total"
    case slotHealthy = "reuseport_slot_healthy"
    case slotHealthConsecutiveFailures = "reuseport_slot_health_consecutive_failures"

    enum Kind: String, Sendable { case counter, gauge }

    var kind: Kind {
        switch self {
        case .buildInfo, .slotBuckets, .slotFlowRecords, .slotLeaving, .slotGeneration, .slotState, .slotSocketUp,
             .slots, .liveSlots, .buckets, .flowRecords, .flowRecordsCapacity, .placementChangePhase,
             .workingGeneration, .lastGeneration, .generationFlows, .unreadableServices, .canaryBuckets,
             .canaryBakeSecondsLeft, .canaryPackets, .canaryReceiveDrops, .slotHealthy, .slotHealthConsecutiveFailures:
            return .gauge
        default:
            return .counter
        }
    }

    /// The labels of its samples, in the order they are written.
    var labels: [String] {
        switch self {
        case .slotPacketsTotal, .slotBytesTotal, .slotFallbacksTotal, .slotBuckets, .slotWorkerRestartsTotal,
             .slotStallsTotal, .slotFlowRecords, .slotLeaving, .slotGeneration, .slotWatchdogRestartsTotal,
             .slotQuicCidSteeredTotal, .slotQuicDcidHashedTotal, .slotDroppedOutputLinesTotal,
             .slotDroppedOutputBytesTotal, .slotHealthProbesPassedTotal, .slotHealthProbesFailedTotal,
             .slotHealthProbesUnreachedTotal, .slotHealthProbesUnaddressableTotal, .slotHealthRestartsTotal,
             .slotHealthFailoversTotal, .slotHealthy, .slotHealthConsecutiveFailures:
            return ["service", "slot"]
        case .canaryBuckets, .canaryBakeSecondsLeft, .canaryPackets, .canaryReceiveDrops, .generationFlows:
            return ["service", "generation"]
        case .slotReceiveDropsTotal, .slotSocketUp:
            return ["service", "slot", "listener"]
        case .slotState:
            return ["service", "slot", "state"]
        case .slots, .liveSlots, .buckets, .droppedNoSlotTotal, .unparsableTotal, .fallbacksTotal, .selectErrorsTotal,
             .tcpMigratedTotal, .tcpMigrateFailedTotal, .flowRecordsCreatedTotal, .flowsUntrackedTotal,
             .flowsUntrackedUncountedTotal, .flowRecordsRateRefusedTotal, .flowPinnedPacketsTotal,
             .flowStalePacketsTotal, .flowRecords, .flowRecordsCapacity, .placementChangePhase, .workingGeneration,
             .lastGeneration, .quicCidSteeredTotal, .quicInitialsTotal, .quicDcidHashedTotal, .quicUnknownCidTotal,
             .quicFallbacksTotal, .quicVersionNegotiationTotal, .quicUnparsableTotal, .failoversTotal,
             .rescueStartsTotal, .removedSlotDropsTotal, .upgradesStartedTotal, .upgradesSwitchedTotal,
             .upgradesAbandonedTotal:
            return ["service"]
        case .unreadableServices:
            return []
        case .buildInfo:
            return ["binary", "version", "commit"]
        }
    }

    var help: String {
        switch self {
        case .buildInfo:
            return "1, labelled with the build of reuseportctl and (stats --prometheus, when it answers) of the daemon."
        case .slotPacketsTotal:
            return "Datagrams (UDP) or connection requests (TCP) the program steered to the slot."
        case .slotBytesTotal:
            return "UDP payload bytes the program steered to the slot."
        case .slotFallbacksTotal:
            return "Packets steered to the slot because their own slot had no socket."
        case .slotReceiveDropsTotal:
            return "Packets the kernel dropped at the slot's socket (sk_drops), per listener."
        case .slotBuckets:
            return "Entries of the bucket table that name the slot."
        case .slotWorkerRestartsTotal:
            return "Worker starts after the first, per slot."
        case .slotStallsTotal:
            return "Times the slot was marked stalled: its receive queue stayed full while the kernel dropped "
                + "datagrams."
        case .slotFlowRecords:
            return "Live flow records naming the slot (daemon's last sweep)."
        case .slotLeaving:
            return "1 while a scale-down drains the slot."
        case .slotGeneration:
            return "The generation of the slot's worker definition."
        case .slotWatchdogRestartsTotal:
            return "Workers stopped (SIGABRT) for sending no WATCHDOG=1 within watchdog_ms, per slot."
        case .slotState:
            return "The slot's worker state (1 for the current state)."
        case .slotQuicCidSteeredTotal:
            return "QUIC packets steered to the slot by the server ID in their connection ID."
        case .slotQuicDcidHashedTotal:
            return "QUIC long-header packets steered to the slot by the hash of their DCID."
        case .slotSocketUp:
            return "1 if the slot has a socket in the listener's array."
        case .slots:
            return "Slots configured (rp_config.slot_count)."
        case .liveSlots:
            return "Slots holding a socket, over which the fallback table is spread (rp_config.live_count)."
        case .buckets:
            return "Entries of the bucket table in use."
        case .droppedNoSlotTotal:
            return "Packets dropped because no slot had a socket (or no configuration)."
        case .unparsableTotal:
            return "Packets the program could not parse (dropped)."
        case .fallbacksTotal:
            return "Packets whose slot had no socket, sent to a live one."
        case .selectErrorsTotal:
            return "bpf_sk_select_reuseport() failures other than an empty slot."
        case .tcpMigratedTotal:
            return "TCP requests of a closing listener the program moved to a live slot (Linux 5.14+)."
        case .tcpMigrateFailedTotal:
            return "TCP requests of a closing listener that found no live slot (the kernel resets them)."
        case .flowRecordsCreatedTotal:
            return "Flow records made while buckets learned for a placement change."
        case .flowsUntrackedTotal:
            return "Flows not recorded because max_tracked_flows was reached (each counted once)."
        case .flowsUntrackedUncountedTotal:
            return "Packets of unrecorded flows that could not even be counted once (marker table full)."
        case .flowRecordsRateRefusedTotal:
            return "Packets whose new flow was refused a record by max_new_flows_per_second."
        case .flowPinnedPacketsTotal:
            return "Packets sent to the slot their flow record names."
        case .flowStalePacketsTotal:
            return "Packets whose recorded slot had no socket: they followed the table."
        case .flowRecords:
            return "Flow records held now."
        case .flowRecordsCapacity:
            return "max_tracked_flows: the records rp_flows can hold."
        case .placementChangePhase:
            return "0: none, 1: learning, 2: draining."
        case .workingGeneration:
            return "The generation taking new flows (0: none recorded)."
        case .lastGeneration:
            return "The last generation number given out; never given again."
        case .generationFlows:
            return "Live flows recorded for the generation's slots while a change runs (0 when none runs)."
        case .slotDroppedOutputLinesTotal:
            return "Lines of the slot's worker output the daemon did not log (over its rate limit)."
        case .slotDroppedOutputBytesTotal:
            return "Bytes of the slot's worker output the daemon did not log (over its rate limit)."
        case .unreadableServices:
            return "Services whose maps could not be read at this scrape."
        case .quicCidSteeredTotal:
            return "QUIC packets steered by the server ID in their connection ID."
        case .quicInitialsTotal:
            return "QUIC long-header Initial packets."
        case .quicDcidHashedTotal:
            return "QUIC long-header packets steered by the hash of their DCID."
        case .quicUnknownCidTotal:
            return "QUIC short-header packets whose CID is not of the service's layout (flow steering)."
        case .quicFallbacksTotal:
            return "QUIC short-header packets whose CID names a slot without a socket (flow steering)."
        case .quicVersionNegotiationTotal:
            return "QUIC version negotiation packets (dropped)."
        case .quicUnparsableTotal:
            return "UDP payloads too short for a QUIC header and DCID (dropped)."
        case .failoversTotal:
            return "Slots failed over (their buckets moved to live slots) since the daemon started."
        case .rescueStartsTotal:
            return "Workers started at once, without back-off, because every other slot was down."
        case .removedSlotDropsTotal:
            return "Datagrams left unread at removed slots' sockets after a scale-down."
        case .upgradesStartedTotal:
            return "Upgrades (new generations) started since the daemon started."
        case .upgradesSwitchedTotal:
            return "Upgrades and roll backs whose buckets switched to their generation."
        case .upgradesAbandonedTotal:
            return "Upgrades given up before their switch (a worker exited or was not ready in time)."
        case .canaryBuckets:
            return "Buckets whose new flows go to the canary generation while it bakes."
        case .canaryBakeSecondsLeft:
            return "Seconds until the canary's bake ends (0 while it learns)."
        case .canaryPackets:
            return "Packets steered to the generation's slots since the canary's bake began (the canary and the working one)."
        case .canaryReceiveDrops:
            return "Datagrams the kernel dropped at the generation's UDP sockets since the canary's bake began."
        case .slotHealthProbesPassedTotal:
            return "Health probes the slot's worker answered as expected."
        case .slotHealthProbesFailedTotal:
            return "Health probes that reached the slot (its counter grew) and got no healthy answer in time."
        case .slotHealthProbesUnreachedTotal:
            return "Health probes the slot's counter did not see (not counted against the worker)."
        case .slotHealthProbesUnaddressableTotal:
            return "Health probes not sent: no source port landed on the slot."
        case .slotHealthRestartsTotal:
            return "Workers replaced for failing their health checks in a row."
        case .slotHealthFailoversTotal:
            return "Times the slot failed over for staying unhealthy through restarts."
        case .slotHealthy:
            return "1 while the slot's worker passes its health checks, 0 while not."
        case .slotHealthConsecutiveFailures:
            return "Failed health probes in a row of the slot's worker."
        }
    }
}
