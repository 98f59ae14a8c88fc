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
    static func render(_ services: [ServiceSnapshot], daemon: DaemonStatus? = nil, unreadable: Int? = nil) -> String {
        registry(services, daemon: daemon, unreadable: unreadable).emitToString()
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

    static func registry(_ services: [ServiceSnapshot], daemon: DaemonStatus? = nil,
                         unreadable: Int? = nil) -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        let builder = Builder(registry: registry)
        for service in services {
            builder.add(service)
            if let status = daemon?[service.name] { builder.add(status, of: service.name) }
        }
        if let unreadable {
            registry.makeGauge(descriptor: descriptor("reuseport_unreadable_services",
                                                      "Services whose maps could not be read at this scrape."))
                .set(Int64(unreadable))
        }
        return registry
    }

    /// Our names are whole (unit suffix included), as docs/cli.md lists them.
    private static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    private struct Builder {
        let registry: PrometheusCollectorRegistry

        func counter(_ name: String, _ help: String, _ labels: [(String, String)], _ value: UInt64) {
            registry.makeCounter(descriptor: descriptor(name, help), labels: labels).increment(by: Int64(clamping: value))
        }

        func gauge(_ name: String, _ help: String, _ labels: [(String, String)], _ value: UInt64) {
            registry.makeGauge(descriptor: descriptor(name, help), labels: labels).set(Int64(clamping: value))
        }

        func add(_ service: ServiceSnapshot) {
            let name = ("service", service.name)
            for slot in service.slots {
                let labels = [name, ("slot", "\(slot.index)")]
                counter("reuseport_slot_packets_total",
                        "Datagrams (UDP) or connection requests (TCP) the program steered to the slot.",
                        labels, slot.counters.packets)
                counter("reuseport_slot_bytes_total", "UDP payload bytes the program steered to the slot.",
                        labels, slot.counters.bytes)
                counter("reuseport_slot_fallbacks_total",
                        "Packets steered to the slot because their own slot had no socket.", labels,
                        slot.counters.fallbacks)
                for socket in slot.sockets {
                    guard let drops = socket.diagnosis?.drops else { continue }
                    counter("reuseport_slot_receive_drops_total",
                            "Packets the kernel dropped at the slot's socket (sk_drops), per listener.",
                            labels + [("listener", "\(socket.listener)")], drops)
                }
                gauge("reuseport_slot_buckets", "Entries of the bucket table that name the slot.", labels,
                      UInt64(slot.buckets))
                counter("reuseport_slot_worker_restarts_total", "Worker starts after the first, per slot.", labels,
                        UInt64(slot.state.restarts))
                counter("reuseport_slot_stalls_total",
                        "Times the slot was marked stalled: its receive queue stayed full while the kernel dropped datagrams.",
                        labels, UInt64(slot.state.stalls))
                gauge("reuseport_slot_flow_records", "Live flow records naming the slot (daemon's last sweep).", labels,
                      UInt64(slot.state.records))
                gauge("reuseport_slot_leaving", "1 while a scale-down drains the slot.", labels, slot.isLeaving ? 1 : 0)
                gauge("reuseport_slot_generation", "The generation of the slot's worker definition.", labels,
                      UInt64(slot.state.generation))
                counter("reuseport_slot_watchdog_restarts_total",
                        "Workers stopped (SIGABRT) for sending no WATCHDOG=1 within watchdog_ms, per slot.", labels,
                        UInt64(slot.state.watchdog_restarts))
                for state in WorkerState.all {
                    gauge("reuseport_slot_state", "The slot's worker state (1 for the current state).",
                          labels + [("state", "\(state)")], slot.workerState == state ? 1 : 0)
                }
                if service.quic != nil {
                    counter("reuseport_slot_quic_cid_steered_total",
                            "QUIC packets steered to the slot by the server ID in their connection ID.", labels,
                            slot.quic.cid_steered)
                    counter("reuseport_slot_quic_dcid_hashed_total",
                            "QUIC long-header packets steered to the slot by the hash of their DCID.", labels,
                            slot.quic.dcid_hashed)
                }
                for listener in service.listeners {
                    gauge("reuseport_slot_socket_up", "1 if the slot has a socket in the listener's array.",
                          labels + [("listener", "\(listener.index)")], listener.cookies[slot.index] == nil ? 0 : 1)
                }
            }
            gauge("reuseport_slots", "Slots configured (rp_config.slot_count).", [name], UInt64(service.config.slot_count))
            gauge("reuseport_live_slots",
                  "Slots holding a socket, over which the fallback table is spread (rp_config.live_count).", [name],
                  UInt64(service.config.live_count))
            gauge("reuseport_buckets", "Entries of the bucket table in use.", [name], UInt64(service.config.bucket_count))
            let global = service.global
            counter("reuseport_dropped_no_slot_total",
                    "Packets dropped because no slot had a socket (or no configuration).", [name], global.dropped_no_slot)
            counter("reuseport_unparsable_total", "Packets the program could not parse (dropped).", [name],
                    global.unparsable)
            counter("reuseport_fallbacks_total", "Packets whose slot had no socket, sent to a live one.", [name],
                    global.fallbacks)
            counter("reuseport_select_errors_total", "bpf_sk_select_reuseport() failures other than an empty slot.",
                    [name], global.select_errors)
            counter("reuseport_tcp_migrated_total",
                    "TCP requests of a closing listener the program moved to a live slot (Linux 5.14+).", [name],
                    global.migrated)
            counter("reuseport_tcp_migrate_failed_total",
                    "TCP requests of a closing listener that found no live slot (the kernel resets them).", [name],
                    global.migrate_failed)
            let flows = service.flows
            counter("reuseport_flow_records_created_total",
                    "Flow records made while buckets learned for a placement change.", [name], flows.recorded)
            counter("reuseport_flows_untracked_total",
                    "Flows not recorded because max_tracked_flows was reached (each counted once).", [name],
                    flows.untracked)
            counter("reuseport_flows_untracked_uncounted_total",
                    "Packets of unrecorded flows that could not even be counted once (marker table full).", [name],
                    flows.untracked_uncounted)
            counter("reuseport_flow_records_rate_refused_total",
                    "Packets whose new flow was refused a record by max_new_flows_per_second.", [name],
                    flows.rate_refused)
            counter("reuseport_flow_pinned_packets_total", "Packets sent to the slot their flow record names.", [name],
                    flows.pinned)
            counter("reuseport_flow_stale_packets_total",
                    "Packets whose recorded slot had no socket: they followed the table.", [name], flows.stale)
            gauge("reuseport_flow_records", "Flow records held now.", [name], UInt64(service.records))
            gauge("reuseport_flow_records_capacity", "max_tracked_flows: the records rp_flows can hold.", [name],
                  UInt64(service.trackedCapacity))
            gauge("reuseport_placement_change_phase", "0: none, 1: learning, 2: draining.", [name],
                  UInt64(service.transition.phase))
            gauge("reuseport_working_generation", "The generation taking new flows (0: none recorded).", [name],
                  UInt64(service.transition.working_generation))
            gauge("reuseport_last_generation", "The last generation number given out; never given again.", [name],
                  UInt64(service.transition.last_generation))
            if service.quic != nil { addQuic(service.quicCounters, [name]) }
        }

        /// The service's QUIC counters (rp_quic_stats), when it steers QUIC by connection ID.
        func addQuic(_ quic: rp_quic_stats, _ labels: [(String, String)]) {
            let counters: [(String, String, UInt64)] = [
                ("reuseport_quic_cid_steered_total", "QUIC packets steered by the server ID in their connection ID.",
                 quic.cid_steered),
                ("reuseport_quic_initials_total", "QUIC long-header Initial packets.", quic.initials),
                ("reuseport_quic_dcid_hashed_total", "QUIC long-header packets steered by the hash of their DCID.",
                 quic.dcid_hashed),
                ("reuseport_quic_unknown_cid_total",
                 "QUIC short-header packets whose CID is not of the service's layout (flow steering).", quic.unknown_cid),
                ("reuseport_quic_fallbacks_total",
                 "QUIC short-header packets whose CID names a slot without a socket (flow steering).", quic.fallbacks),
                ("reuseport_quic_version_negotiation_total", "QUIC version negotiation packets (dropped).",
                 quic.version_negotiation),
                ("reuseport_quic_unparsable_total", "UDP payloads too short for a QUIC header and DCID (dropped).",
                 quic.unparsable),
            ]
            for (metric, help, value) in counters { counter(metric, help, labels, value) }
        }

        /// The daemon's own counters (since it started): absent from an older daemon's answer.
        func add(_ status: ServiceStatus, of service: String) {
            let name = ("service", service)
            let perService: [(String, String, Int?)] = [
                ("reuseport_failovers_total", "Slots failed over (their buckets moved to live slots) since the daemon started.",
                 status.failovers),
                ("reuseport_rescue_starts_total",
                 "Workers started at once, without back-off, because every other slot was down.", status.rescueStarts),
                ("reuseport_removed_slot_drops_total",
                 "Datagrams left unread at removed slots' sockets after a scale-down.", status.removedSlotDrops),
                ("reuseport_upgrades_started_total", "Upgrades (new generations) started since the daemon started.",
                 status.upgrades?.started),
                ("reuseport_upgrades_switched_total",
                 "Upgrades and roll backs whose buckets switched to their generation.", status.upgrades?.switched),
                ("reuseport_upgrades_abandoned_total",
                 "Upgrades given up before their switch (a worker exited or was not ready in time).",
                 status.upgrades?.abandoned),
            ]
            for (metric, help, value) in perService {
                if let value { counter(metric, help, [name], UInt64(clamping: value)) }
            }
            if let upgrade = status.upgrade, upgrade.phase == .canary {
                let labels = [name, ("generation", "\(upgrade.generation)")]
                gauge("reuseport_canary_buckets", "Buckets whose new flows go to the canary generation while it bakes.",
                      labels, UInt64(clamping: upgrade.canaryBuckets ?? 0))
                let now = WallClock.nanoseconds()
                gauge("reuseport_canary_bake_seconds_left", "Seconds until the canary's bake ends (0 while it learns).",
                      labels, upgrade.bakeEndsNs.map { $0 > now ? ($0 - now) / 1_000_000_000 : 0 } ?? 0)
            }
            for slot in status.slots {
                let labels = [name, ("slot", "\(slot.slot)")]
                if let lines = slot.droppedOutputLines {
                    counter("reuseport_slot_dropped_output_lines_total",
                            "Lines of the slot's worker output the daemon did not log (over its rate limit).", labels,
                            UInt64(clamping: lines))
                }
                if let bytes = slot.droppedOutputBytes {
                    counter("reuseport_slot_dropped_output_bytes_total",
                            "Bytes of the slot's worker output the daemon did not log (over its rate limit).", labels,
                            UInt64(clamping: bytes))
                }
                if let health = slot.health { add(health, labels) }
            }
        }

        /// A slot's active health checks ([service.health_check]).
        func add(_ health: SlotHealthStatus, _ labels: [(String, String)]) {
            let counters: [(String, String, Int)] = [
                ("reuseport_slot_health_probes_passed_total", "Health probes the slot's worker answered as expected.",
                 health.passed),
                ("reuseport_slot_health_probes_failed_total",
                 "Health probes that reached the slot (its counter grew) and got no healthy answer in time.",
                 health.failed),
                ("reuseport_slot_health_probes_unreached_total",
                 "Health probes the slot's counter did not see (not counted against the worker).", health.unreached),
                ("reuseport_slot_health_probes_unaddressable_total",
                 "Health probes not sent: no source port landed on the slot.", health.unaddressable),
                ("reuseport_slot_health_restarts_total",
                 "Workers replaced for failing their health checks in a row.", health.restarts),
                ("reuseport_slot_health_failovers_total",
                 "Times the slot failed over for staying unhealthy through restarts.", health.failovers),
            ]
            for (metric, help, value) in counters { counter(metric, help, labels, UInt64(clamping: value)) }
            gauge("reuseport_slot_healthy", "1 while the slot's worker passes its health checks, 0 while not.", labels,
                  health.healthy ? 1 : 0)
            gauge("reuseport_slot_health_consecutive_failures", "Failed health probes in a row of the slot's worker.",
                  labels, UInt64(clamping: health.consecutiveFailures))
        }
    }
}
