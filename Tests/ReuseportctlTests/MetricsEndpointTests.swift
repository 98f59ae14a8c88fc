#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// `serve-metrics` against real pins and real datagrams: its HTTP answer passes promtool, a real
/// Prometheus server scrapes it, and the process that answers is not root.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "pinning BPF maps and dropping to another user need root"))
struct MetricsEndpointTests {
    @Test func prometheusScrapesTheSlotCountersFromAnUnprivilegedServer() throws {
        let root = PinRoot("serve-metrics")
        let service = try PinnedService(root: root, name: "edge", slots: 3)
        let clients = try Traffic.clients(30, on: .loopbackV4)
        let landed = try sendAndReceive(clients, to: service, size: 7)
        let endpoint = try MetricsEndpoint(pinRoot: root.path)

        // The process that speaks HTTP runs as nobody, every one of its ids (real, effective, saved, fs).
        let status = try String(contentsOfFile: "/proc/\(endpoint.serverPid)/status", encoding: .utf8)
        let uids = status.split(separator: "\n").first { $0.hasPrefix("Uid:") }
        #expect(uids?.split(whereSeparator: \.isWhitespace).dropFirst() == ["65534", "65534", "65534", "65534"],
                "\(uids ?? "no Uid line")")

        let exposition = try httpGet(endpoint.address, "/metrics")
        #expect(exposition.status == 200, "\(exposition)")
        let samples = try PrometheusSamples(exposition.body)
        for slot in 0..<UInt32(3) {
            let count = Double(landed.values.filter { $0 == slot }.count)
            #expect(samples[#"reuseport_slot_packets_total{service="edge",slot="\#(slot)"}"#] == count)
        }
        let file = NSTemporaryDirectory() + "reuseport-metrics-\(getpid()).prom"
        try exposition.body.write(toFile: file, atomically: true, encoding: .utf8)
        defer { unlink(file) }
        let check = try run("/bin/sh", ["-c", "promtool check metrics < \(file)"])
        #expect(check.status == 0, "promtool: \(check)")

        let prometheus = try PrometheusServer(scraping: endpoint.address)
        let series = try prometheus.query("reuseport_slot_packets_total", expecting: 3)
        var bySlot: [String: Double] = [:]
        for entry in series {
            let metric = entry["metric"] as? [String: String]
            let value = (entry["value"] as? [Any])?.last as? String
            if let slot = metric?["slot"], metric?["service"] == "edge", let value { bySlot[slot] = Double(value) }
        }
        for slot in 0..<UInt32(3) {
            #expect(bySlot["\(slot)"] == Double(landed.values.filter { $0 == slot }.count), "\(series)")
        }
    }

    /// The process that speaks HTTP holds no map it could write: each BPF map fd it holds (found
    /// in /proc/PID/fd, described by /proc/PID/fdinfo) is copied out with pidfd_getfd and refuses
    /// a write with EPERM, as a read-only fd does (kernel/bpf/syscall.c, map_update_elem()). The
    /// write asks BPF_F_LOCK, which none of these maps allows: where the fd is writable the kernel
    /// says EINVAL, after its permission check and before it writes anything. The metrics are
    /// served alike before and after.
    @Test func theServerHoldsEveryMapReadOnly() throws {
        let root = PinRoot("serve-metrics-readonly")
        let service = try PinnedService(root: root, name: "edge", slots: 3)
        let clients = try Traffic.clients(30, on: .loopbackV4)
        let landed = try sendAndReceive(clients, to: service, size: 7)
        let bucketsBefore = try DispatchMaps(pinned: service.layout).readBuckets()
        let endpoint = try MetricsEndpoint(pinRoot: root.path)
        func checkScrape(_ when: String) throws {
            let exposition = try httpGet(endpoint.address, "/metrics")
            #expect(exposition.status == 200, "\(when): \(exposition)")
            let samples = try PrometheusSamples(exposition.body)
            for slot in 0..<UInt32(3) {
                #expect(samples[#"reuseport_slot_packets_total{service="edge",slot="\#(slot)"}"#]
                            == Double(landed.values.filter { $0 == slot }.count), "\(when): slot \(slot)")
            }
        }
        try checkScrape("before the probe")

        let pid = endpoint.serverPid
        let pidfd = try Syscall.pidfdOpen(pid)
        var maps: [String] = []
        var writable: [String] = []
        for name in Syscall.directoryEntries("/proc/\(pid)/fd") {
            guard let fd = Int32(name), (try? Syscall.linkTarget("/proc/\(pid)/fd/\(fd)")) == "anon_inode:bpf-map",
                  let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8)
            else { continue }
            var fields: [String: String] = [:]
            for line in info.split(separator: "\n") {
                let parts = line.split(separator: ":", maxSplits: 1)
                if parts.count == 2 { fields[String(parts[0])] = parts[1].trimmingCharacters(in: .whitespaces) }
            }
            let flags = Int(fields["flags"] ?? "", radix: 8) ?? -1
            let keySize = Int(fields["key_size"] ?? "") ?? 0
            let valueSize = Int(fields["value_size"] ?? "") ?? 0
            let label = "fd \(fd) (map_type \(fields["map_type"] ?? "?"), map_id \(fields["map_id"] ?? "?"), "
                + "flags 0\(String(flags, radix: 8)))"
            maps.append(label)
            let copy = try Syscall.pidfdGetDescriptor(pidfd, fd)
            defer { copy.close() }
            // Room for any value: per-CPU maps take one per possible CPU.
            var key = [UInt8](repeating: 0, count: max(keySize, 8))
            var value = [UInt8](repeating: 0, count: max(valueSize, 8) * 1024)
            let status = copy.withFD { bpf_map_update_elem($0, &key, &value, UInt64(BPF_F_LOCK)) }
            let code = errno
            if status == 0 || code != EPERM {
                writable.append("\(label): bpf_map_update_elem answered \(status == 0 ? "0" : String(cString: strerror(code)))")
            }
            #expect(Int32(truncatingIfNeeded: flags) & O_ACCMODE == O_RDONLY, "\(label) is opened read-only in fdinfo")
        }
        pidfd.close()
        // One service: its 15 shared maps and one socket array.
        #expect(maps.count == DispatchMaps.names.count + 1, "the server holds the service's maps: \(maps)")
        #expect(writable.isEmpty, "map fds of the HTTP process that take a write: \(writable)")
        #expect(try DispatchMaps(pinned: service.layout).readBuckets() == bucketsBefore, "the buckets are untouched")
        try checkScrape("after the probe")
    }

    /// dist/reuseportd-metrics.service is enough: both processes run with nothing but the unit's
    /// CapabilityBoundingSet=, no_new_privs (NoNewPrivileges=yes) and a read-only bpffs
    /// (ProtectKernelTunables=), as systemd would start them. The server serves the pinned
    /// service, and when a service is pinned later the keeper (root) stops the server (by then
    /// nobody: CAP_KILL) and the new one serves both.
    @Test func theMetricsUnitsCapabilitiesAreEnough() throws {
        let unit = try String(contentsOfFile: "\(Self.packageRoot)/dist/reuseportd-metrics.service", encoding: .utf8)
        let capabilities = unit.split(separator: "\n").filter { $0.hasPrefix("CapabilityBoundingSet=") }
            .flatMap { $0.dropFirst("CapabilityBoundingSet=".count).split(separator: " ") }
        #expect(!capabilities.isEmpty, "the unit sets CapabilityBoundingSet=")
        #expect(unit.contains("\nNoNewPrivileges=yes\n") && unit.contains("\nProtectKernelTunables=yes\n"))
        let bounding = (["-all"] + capabilities.map { "+" + $0.dropFirst("CAP_".count).lowercased() }).joined(separator: ",")

        let root = PinRoot("serve-metrics-unit")
        let first = try PinnedService(root: root, name: "edge", slots: 2)
        _ = try sendAndReceive(try Traffic.clients(10, on: .loopbackV4), to: first, size: 7)
        let script = """
            mount --make-rprivate / && mount -o remount,bind,ro /sys/fs/bpf && \
            exec setpriv --bounding-set=\(bounding) --inh-caps=-all --ambient-caps=-all --no-new-privs -- "$@"
            """
        let endpoint = try MetricsEndpoint(pinRoot: root.path, wrapper: ["/usr/bin/unshare", "-m", "/bin/sh", "-c", script, "sh"],
                                           extra: ["--rescan", "0.2"])
        // Port 0: each server the keeper starts binds a port of its own and says which.
        func latestAddress() throws -> ReuseportKit.SocketAddress {
            let lines = endpoint.process.text.split(separator: "\n").filter { $0.hasPrefix("serving metrics on http://") }
            guard let url = lines.last?.split(separator: " ").first(where: { $0.hasPrefix("http://") }) else {
                return endpoint.address
            }
            return try ReuseportKit.SocketAddress(parsing: String(url.dropFirst("http://".count).dropLast("/metrics".count)))
        }
        func served() throws -> Set<String> {
            let exposition = try httpGet(try latestAddress(), "/metrics")
            #expect(exposition.status == 200, "\(exposition)")
            return Set(try PrometheusSamples(exposition.body).values.keys.compactMap { key -> String? in
                guard key.hasPrefix("reuseport_slot_packets_total{service=\"") else { return nil }
                return String(key.dropFirst("reuseport_slot_packets_total{service=\"".count).prefix { $0 != "\"" })
            })
        }
        #expect(try served() == ["edge"], "bounding set \(bounding)")

        let second = try PinnedService(root: root, name: "later", slots: 1)
        let deadline = MonotonicClock.milliseconds() + 15_000
        var seen: Set<String> = []
        while MonotonicClock.milliseconds() < deadline {
            seen = (try? served()) ?? []
            if seen == ["edge", "later"] { break }
            // Reads what the keeper's servers print (and ends the wait if the keeper ended).
            if endpoint.process.wait(timeoutMs: 100) != nil { break }
        }
        #expect(seen == ["edge", "later"], "the keeper replaced the server: \(endpoint.process.text) \(String(decoding: endpoint.process.errorBytes, as: UTF8.self))")
        #expect(endpoint.process.text.components(separatedBy: "serving metrics on").count == 3, "\(endpoint.process.text)")
        withExtendedLifetime(second) {}
    }

    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    @Test func listenErrorsSayWhatIsWrong() throws {
        let taken = try FlowClient(.tcp, local: ReuseportKit.SocketAddress(.loopbackV4, 0))
        #expect(Glibc.listen(taken.fd, 1) == 0)
        let root = PinRoot("serve-metrics-errors")
        let busy = try reuseportctl(["serve-metrics", "--listen", "\(taken.local)", "--pin-dir", root.path])
        #expect(busy.status == 1, "\(busy)")
        #expect(busy.stderr.contains("cannot serve on \(taken.local): bind(): Address already in use (errno 98)"),
                "\(busy)")
        let bad = try reuseportctl(["serve-metrics", "--listen", "localhost:9466"])
        #expect(bad.status == 2, "\(bad)")
        #expect(bad.stderr.contains("'localhost' is not an IPv4 or IPv6 address"), "\(bad)")
    }
}

/// A running `reuseportctl serve-metrics --listen 127.0.0.1:0`, stopped on release.
final class MetricsEndpoint {
    let process: Subprocess
    let address: ReuseportKit.SocketAddress
    let serverPid: pid_t

    /// `wrapper`: a command that execs the rest (the keeper keeps its pid).
    init(pinRoot: String, wrapper: [String] = [], extra: [String] = []) throws {
        let command = [BuiltProducts.path("reuseportctl"),
                       "serve-metrics", "--listen", "127.0.0.1:0", "--pin-dir", pinRoot, "--user", "nobody"] + extra
        let full = wrapper + command
        process = try Subprocess(full[0], Array(full.dropFirst()), captureStandardError: true)
        let deadline = MonotonicClock.milliseconds() + 20_000
        // "serving metrics on http://127.0.0.1:PORT/metrics as nobody (...), pid N"
        while !process.text.contains("\n"), MonotonicClock.milliseconds() < deadline {
            if process.wait(timeoutMs: 100) != nil { break }
        }
        let line = process.text.split(separator: "\n").first.map(String.init) ?? ""
        guard let url = line.split(separator: " ").first(where: { $0.hasPrefix("http://") }),
              let pid = line.split(separator: " ").last.flatMap({ pid_t($0) }) else {
            throw HarnessError("serve-metrics did not start: \(process.text) \(String(decoding: process.errorBytes, as: UTF8.self))")
        }
        address = try ReuseportKit.SocketAddress(parsing: String(url.dropFirst("http://".count).dropLast("/metrics".count)))
        serverPid = pid
    }

    deinit {
        try? Syscall.kill(process.pid, SIGTERM)
        _ = process.wait(timeoutMs: 5000)
    }
}

/// A Prometheus server on a free loopback port with a throwaway configuration and data folder,
/// scraping `target` every second; stopped (and its folder removed) on release.
final class PrometheusServer {
    let folder: String
    let address: ReuseportKit.SocketAddress
    let process: Subprocess

    init(scraping target: ReuseportKit.SocketAddress) throws {
        folder = NSTemporaryDirectory() + "reuseport-prometheus-\(getpid())-\(MonotonicClock.milliseconds())"
        try FileManager.default.createDirectory(atPath: folder + "/data", withIntermediateDirectories: true)
        try """
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: reuseport
                static_configs:
                  - targets: ['\(target)']
            """.write(toFile: folder + "/prometheus.yml", atomically: true, encoding: .utf8)
        address = ReuseportKit.SocketAddress(.loopbackV4, try freePort())
        process = try Subprocess("/usr/bin/prometheus", [
            "--config.file=\(folder)/prometheus.yml", "--storage.tsdb.path=\(folder)/data",
            "--web.listen-address=\(address)", "--log.level=warn",
        ], captureStandardError: true)
    }

    /// The instant vector of `query` once it has `count` series (30 s at most).
    func query(_ query: String, expecting count: Int) throws -> [[String: Any]] {
        let deadline = MonotonicClock.milliseconds() + 30_000
        var last = ""
        while MonotonicClock.milliseconds() < deadline {
            if process.wait(timeoutMs: 500) != nil {
                throw HarnessError("prometheus ended: \(String(decoding: process.errorBytes, as: UTF8.self))")
            }
            guard let answer = try? httpGet(address, "/api/v1/query?query=\(query)"), answer.status == 200 else { continue }
            last = answer.body
            let json = try JSONSerialization.jsonObject(with: Data(answer.body.utf8)) as? [String: Any]
            let result = (json?["data"] as? [String: Any])?["result"] as? [[String: Any]] ?? []
            if result.count == count { return result }
        }
        throw HarnessError("prometheus had no \(count) series of \(query) within 30 s; last answer: \(last)")
    }

    deinit {
        try? Syscall.kill(process.pid, SIGTERM)
        _ = process.wait(timeoutMs: 10_000)
        try? FileManager.default.removeItem(atPath: folder)
    }
}

/// One HTTP/1.0 GET over a real TCP connection: status and body.
func httpGet(_ address: ReuseportKit.SocketAddress, _ path: String) throws -> (status: Int, body: String) {
    let client = try FlowClient(.tcp, local: ReuseportKit.SocketAddress(.loopbackV4, 0))
    try client.connect(to: address)
    let request = Array("GET \(path) HTTP/1.0\r\nHost: \(address)\r\nConnection: close\r\n\r\n".utf8)
    // A server that closed just after it accepted (the keeper replacing it at a rescan) fails the
    // write, as a refused connect fails above: thrown, for the callers that retry to retry.
    guard request.withUnsafeBytes({ Glibc.write(client.fd, $0.baseAddress, $0.count) }) == request.count else {
        throw HarnessError("GET \(path) to \(address): write: \(String(cString: strerror(errno)))")
    }
    var response: [UInt8] = []
    while let chunk = try client.receive(timeoutMs: 5000), !chunk.isEmpty { response += chunk }
    let text = String(decoding: response, as: UTF8.self)
    guard let split = text.range(of: "\r\n\r\n"), let status = Int(text.split(separator: " ").dropFirst().first ?? "") else {
        throw HarnessError("not an HTTP response from \(address)\(path): \(text)")
    }
    return (status, String(text[split.upperBound...]))
}
