#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import CLibbpf
import CSockDiag
import ReuseportKit

/// `features`: probes the running kernel for everything reuseportd needs.
struct FeaturesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "features",
        abstract: "Probe the running kernel for what reuseportd needs.",
        discussion: """
            Each probe asks the kernel itself (loads a program, creates a map, binds sockets on \
            127.0.0.1 and sends one datagram through the steering program); nothing is inferred \
            from the version number except where the line says "by version". SINCE is the kernel \
            release that brought the feature.

            Exit status: 0 when every required feature is present, 1 otherwise.

            Examples:
              reuseportctl features
              reuseportctl features --json | jq '.features[] | select(.present | not)'
            """
    )

    @Flag(help: "Print JSON (schema: cli.md in /usr/share/doc/reuseportd).")
    var json = false

    func run() throws {
        let report = KernelProbe.run()
        if json {
            print(try JSONOutput.string(report))
        } else {
            print(report.text, terminator: "")
        }
        let missing = report.features.filter { $0.required && $0.present == false }
        let unknown = report.features.filter { $0.required && $0.present == nil }
        if !missing.isEmpty {
            throw CtlError.featuresMissing("required kernel features missing: " + missing.map(\.name).joined(separator: ", ")
                                    + (unknown.isEmpty ? "" : "; \(unknown.count) more not probed without privileges"))
        }
    }
}

struct FeatureReport: Encodable {
    struct Feature: Encodable {
        var name: String
        var since: String
        var required: Bool
        /// nil: not probed (the probe needs privileges this process lacks).
        @Nullable var present: Bool?
        var detail: String
    }

    var kernel: String
    var machine: String
    var features: [Feature]

    var text: String {
        var table = TextTable([("FEATURE", .left), ("SINCE", .left), ("STATUS", .left), ("DETAIL", .left)])
        for feature in features {
            let status = switch feature.present {
            case true?: "present"
            case false?: feature.required ? "MISSING" : "missing (optional)"
            case nil: "unknown"
            }
            table.add([feature.name, feature.since, status, feature.detail])
        }
        return "kernel \(kernel) (\(machine))\n\n" + table.render()
    }
}

/// The probes, each asking the kernel directly.
enum KernelProbe {
    static func run() -> FeatureReport {
        var system = utsname()
        uname(&system)
        let release = withUnsafeBytes(of: system.release) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        let machine = withUnsafeBytes(of: system.machine) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        var features: [FeatureReport.Feature] = []
        let privileged = privileges()
        // Without the privileges every BPF probe fails with EPERM, which says nothing about the kernel.
        func add(_ name: String, _ since: String, required: Bool = true, needsPrivileges: Bool = true,
                 _ probe: () -> (Bool, String)) {
            if needsPrivileges && !privileged.0 {
                features.append(.init(name: name, since: since, required: required, present: nil,
                                      detail: "not probed: needs the privileges above"))
                return
            }
            let (present, detail) = probe()
            features.append(.init(name: name, since: since, required: required, present: present, detail: detail))
        }

        add("privileges to load and attach BPF", "5.8 (CAP_BPF)", needsPrivileges: false) { privileged }
        add("bpffs at \(BPFFilesystem.mountPoint)", "4.4", needsPrivileges: false) { bpffs() }
        add("BPF_PROG_TYPE_SK_REUSEPORT", "4.19") {
            libbpfProbe(libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_SK_REUSEPORT, nil), "program type")
        }
        add("BPF_MAP_TYPE_REUSEPORT_SOCKARRAY", "4.19") {
            libbpfProbe(libbpf_probe_bpf_map_type(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, nil), "map type")
        }
        add("BPF_MAP_TYPE_PERCPU_ARRAY", "4.6") {
            libbpfProbe(libbpf_probe_bpf_map_type(BPF_MAP_TYPE_PERCPU_ARRAY, nil), "map type")
        }
        for (helper, name) in [(BPF_FUNC_sk_select_reuseport, "bpf_sk_select_reuseport"),
                               (BPF_FUNC_skb_load_bytes_relative, "bpf_skb_load_bytes_relative"),
                               (BPF_FUNC_skb_load_bytes, "bpf_skb_load_bytes")] {
            add("helper \(name) in sk_reuseport", "4.19") {
                libbpfProbe(libbpf_probe_bpf_helper(BPF_PROG_TYPE_SK_REUSEPORT, helper, nil), "helper")
            }
        }
        add("rp_dispatch passes the verifier (sk_reuseport_md data, data_end, len, eth_protocol, ip_protocol; "
            + "statistics log)", "5.2") { dispatchProgram() }
        add("SO_ATTACH_REUSEPORT_EBPF steering, end to end", "4.19") { steering() }
        add("flow records (hash map without preallocation, updated by the steering program)", "5.10",
            required: false) { flowRecords() }
        add("coarse clock for flow records (bpf_ktime_get_coarse_ns in sk_reuseport)", "5.11", required: false) {
            CoarseClock.isSupported
                ? (true, "records are stamped with CLOCK_MONOTONIC_COARSE: a pinned packet reads the cheaper clock")
                : (false, "records are stamped with bpf_ktime_get_ns(), which costs more on every pinned packet")
        }
        add("TCP requests of a closing listener migrated by the program (SELECT_OR_MIGRATE)", "5.14",
            required: false) {
            ReuseportMigration.isSupported
                ? (true, "rp_dispatch_migrate is loaded: a leaving listener's handshakes move to a live slot")
                : (false, "a leaving TCP listener closes once its accept queue stayed empty; later handshakes are reset")
        }
        add("sock_diag socket memory info (receive drops)", "3.6", required: false, needsPrivileges: false) { socketDrops() }
        add("maps charged to memcg, not RLIMIT_MEMLOCK", "5.11", required: false, needsPrivileges: false) {
            memcgAccounting(release)
        }
        add("BPF run-time statistics (bpf_enable_stats)", "5.8", required: false) { runStatistics() }
        return FeatureReport(kernel: release, machine: machine, features: features)
    }

    static func libbpfProbe(_ result: Int32, _ what: String) -> (Bool, String) {
        switch result {
        case 1: return (true, "the kernel accepts this \(what)")
        case 0: return (false, "the kernel rejects this \(what)")
        default: return (false, "probe failed: \(String(cString: strerror(-result)))")
        }
    }

    static func privileges() -> (Bool, String) {
        let effective = capabilities()
        func has(_ capability: Int32) -> Bool { effective.map { $0 & (1 << UInt64(capability)) != 0 } ?? false }
        let names = [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                     (CAP_PERFMON, "CAP_PERFMON")].filter { has($0.0) }.map(\.1)
        let held = names.isEmpty ? "no BPF-related capabilities" : names.joined(separator: ", ")
        let who = geteuid() == 0 ? "root" : "uid \(geteuid())"
        let enough = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN))
        return (enough, enough ? "\(who), \(held)" : "\(who), \(held): needs root, or CAP_BPF + CAP_NET_ADMIN")
    }

    /// CapEff of this process (/proc/self/status).
    static func capabilities() -> UInt64? {
        guard let file = fopen("/proc/self/status", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            if text.hasPrefix("CapEff:") {
                return UInt64(text.dropFirst("CapEff:".count).trimmingBlanks, radix: 16)
            }
        }
        return nil
    }

    static func bpffs() -> (Bool, String) {
        if BPFFilesystem.isBPF(BPFFilesystem.mountPoint) { return (true, "mounted") }
        guard let file = fopen("/proc/filesystems", "r") else { return (false, "cannot read /proc/filesystems") }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            if line.withUnsafeBufferPointer({ String(cString: $0.baseAddress!) }).split(whereSeparator: { $0 == "\t" || $0 == " " || $0 == "\n" }).last == "bpf" {
                return (true, "not mounted, but the kernel has it: the daemon mounts it"
                        + " (mount -t bpf bpf \(BPFFilesystem.mountPoint); needs CAP_SYS_ADMIN)")
            }
        }
        return (false, "the kernel has no bpf filesystem")
    }

    /// Loads a four-instruction SK_REUSEPORT program with a backward jump: verifiers before
    /// 5.3 reject any back-edge ("back-edge from insn"); later ones prove it terminates.
    static func dispatchProgram() -> (Bool, String) {
        do {
            let program = try DispatchProgram()
            let cost = program.verifier.processedInstructions.map { ", processing \($0) instructions" } ?? ""
            return (true, "the verifier accepted rp_dispatch\(cost)")
        } catch {
            return (false, "rp_dispatch does not load: \(error)")
        }
    }

    /// Two slots on 127.0.0.1:0; one datagram must reach the slot the flow hash predicts and
    /// be counted by the program.
    static func steering() -> (Bool, String) {
        do {
            let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                             options: .init(seed: 0x5eed))
            defer { plane.close() }
            let destination = plane.listeners[0].endpoint.address
            let client = try ProbeClient()
            defer { client.close() }
            try client.send(to: destination)
            let predicted = try plane.snapshot().placement(of: FlowTuple(.udp, from: client.local, to: destination)).slot
            guard let landed = receive(plane.listeners[0].sockets) else {
                return (false, "the datagram did not arrive on any slot within 1 s")
            }
            let counted = try plane.maps.slotCounters(landed).packets
            guard landed == predicted, counted == 1 else {
                return (false, "landed on slot \(landed), predicted \(HumanFormat.optional(predicted)), counted \(counted)")
            }
            return (true, "a datagram landed on the predicted slot and was counted")
        } catch {
            return (false, "\(error)")
        }
    }

    /// Two slots; a change to four learns, and 16 flows send one datagram each: every flow of a
    /// moving bucket must leave a record naming the slot it landed on (the program wrote rp_flows).
    static func flowRecords() -> (Bool, String) {
        do {
            let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                             options: .init(seed: 0x5eed))
            defer { plane.close() }
            try plane.beginResize(to: 4, now: MonotonicClock.nanoseconds(), learnNs: 60_000_000_000)
            let target = plane.pending!.effective
            let destination = plane.listeners[0].endpoint.address
            var recorded = 0
            for _ in 0..<16 {
                let client = try ProbeClient()
                defer { client.close() }
                try client.send(to: destination)
                guard let landed = receive(plane.listeners[0].sockets) else {
                    return (false, "a datagram did not arrive on any slot within 1 s")
                }
                _ = try Syscall.discardDatagram(plane.listeners[0].sockets[landed]!.fd)
                let flow = FlowTuple(.udp, from: client.local, to: destination)
                let bucket = Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: 0x5eed), count: UInt32(target.count)))
                guard target[bucket] != plane.effectiveBuckets[bucket] else { continue }
                guard let record = try FlowRecords.record(of: flow, in: plane.maps), record.slot == landed else {
                    return (false, "a flow of a learning bucket landed on slot \(landed) without a record naming it")
                }
                recorded += 1
            }
            return (true, "\(recorded) flows of learning buckets recorded with their slot")
        } catch {
            return (false, "\(error)")
        }
    }

    static func receive(_ sockets: [UInt32: ReuseportSocket]) -> UInt32? {
        let order = sockets.keys.sorted()
        let fds = order.map { sockets[$0]!.fd }
        guard let ready = try? Syscall.poll(fds, timeoutMs: 1000) else { return nil }
        return fds.firstIndex(where: ready.contains).map { order[$0] }
    }

    static func socketDrops() -> (Bool, String) {
        do {
            let socket = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(.loopbackV4, 0)))
            defer { socket.close() }
            let cookie = try socket.cookie()
            guard let found = try SocketDiagnostics.sockets([.udp])[cookie] else {
                return (false, "sock_diag did not list a bound UDP socket")
            }
            return found.drops == nil ? (false, "sock_diag lists sockets without SK_MEMINFO_DROPS")
                : (true, "per-socket drops, matched by cookie")
        } catch {
            return (false, "\(error)")
        }
    }

    static func memcgAccounting(_ release: String) -> (Bool, String) {
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        let atLeast = parts.count == 2 && (parts[0], parts[1]) >= (5, 11)
        if atLeast { return (true, "by version") }
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit)
        let text = limit.rlim_cur == rlim_t.max ? "unlimited" : HumanFormat.bytes(UInt64(limit.rlim_cur))
        return (false, "by version: maps count against RLIMIT_MEMLOCK (now \(text))")
    }

    static func runStatistics() -> (Bool, String) {
        let fd = bpf_enable_stats(BPF_STATS_RUN_TIME)
        if fd < 0 { return (false, String(cString: strerror(-fd))) }
        Syscall.close(fd)
        return (true, "enabled and disabled again")
    }
}

/// A UDP client on 127.0.0.1 with a kernel-chosen port, for the steering probe.
final class ProbeClient {
    private let descriptor: OwnedDescriptor
    let local: SocketAddress

    init() throws {
        descriptor = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "udp")
        try Syscall.bind(descriptor.fd, SocketAddress(.loopbackV4, 0), "udp://127.0.0.1:0")
        local = try Syscall.localAddress(descriptor.fd, "udp://127.0.0.1:0")!
    }

    func send(to destination: SocketAddress) throws {
        try Array("reuseportctl features".utf8).withUnsafeBytes { try Syscall.send(descriptor.fd, $0, to: destination) }
    }

    func close() { descriptor.close() }
}

extension Substring {
    var trimmingBlanks: String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" || $0 == "\n" }.reversed())
    }
}
