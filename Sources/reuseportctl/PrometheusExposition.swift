import ReuseportKit

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
        family("reuseport_slot_stalls_total", "counter",
               "Times the slot was marked stalled: its receive queue stayed full while the kernel dropped datagrams.",
               perSlot { UInt64($0.state.stalls) })
        family("reuseport_slot_watchdog_restarts_total", "counter",
               "Workers stopped (SIGABRT) for sending no WATCHDOG=1 within watchdog_ms, per slot.",
               perSlot { UInt64($0.state.watchdog_restarts) })
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
        family("reuseport_live_slots", "gauge",
               "Slots holding a socket, over which the fallback table is spread (rp_config.live_count).") {
            [([], "\($0.config.live_count)")]
        }
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
