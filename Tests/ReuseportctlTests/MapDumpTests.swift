#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// `map dump` against a service the test pins itself: real maps, real sockets, real datagrams.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "pinning BPF maps and loading the program needs root"))
struct MapDumpTests {
    /// The JSON lists every slot with the pid and state written, and its counters equal the
    /// datagrams each slot received.
    @Test func jsonListsSlotsPidsAndCountsEveryDatagram() throws {
        let root = PinRoot("dump-json")
        let service = try PinnedService(root: root, slots: 4)
        for slot in 0..<UInt32(4) {
            try service.setState(slot, pid: 4000 + slot, state: .running, restarts: slot, since: 1_000_000_000)
        }
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let landed = try sendAndReceive(clients, to: service, size: 10)
        #expect(landed.count == 64)

        let result = try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path])
        #expect(result.status == 0, "\(result)")
        let dump = try #require(try decodeJSON(result.stdout) as? [String: Any])
        #expect(dump["version"] as? Int == 1)
        let services = try #require(dump["services"] as? [[String: Any]])
        #expect(services.count == 1)
        let svc = services[0]
        #expect(svc["name"] as? String == "svc")
        #expect(svc["seed"] as? Int == 0x5eed)
        #expect(svc["bucket_count"] as? Int == 64)
        #expect(svc["slot_count"] as? Int == 4)
        #expect(svc["live_count"] as? Int == 4)
        let listeners = try #require(svc["listeners"] as? [[String: Any]])
        #expect(listeners.first?["endpoint"] as? String == service.endpoint.description)
        let slots = try #require(svc["slots"] as? [[String: Any]])
        #expect(slots.map { $0["slot"] as? Int } == [0, 1, 2, 3])
        var bucketTotal = 0
        for entry in slots {
            let slot = UInt32(entry["slot"] as! Int)
            let received = landed.values.filter { $0 == slot }.count
            #expect(entry["pid"] as? Int == Int(4000 + slot))
            #expect(entry["state"] as? String == "running")
            #expect(entry["restarts"] as? Int == Int(slot))
            #expect(entry["packets"] as? Int == received, "slot \(slot)")
            #expect(entry["bytes"] as? Int == received * 10, "slot \(slot)")
            #expect(entry["fallbacks"] as? Int == 0)
            #expect(entry["receive_drops"] as? Int == 0)
            let sockets = try #require(entry["sockets"] as? [[String: Any]])
            #expect(sockets.first?["cookie"] as? UInt64 == (try service.cookie(slot)))
            bucketTotal += entry["buckets"] as? Int ?? 0
            #expect(entry["buckets"] as? Int == 16)
        }
        #expect(bucketTotal == 64)
        let global = try #require(svc["global"] as? [String: Any])
        #expect(global["dropped_no_slot"] as? Int == 0)

        // The documented schema (docs/cli.md), key for key: nothing missing, nothing unannounced.
        #expect(Set(dump.keys) == ["version", "pin_dir", "now_ns", "services", "errors", "daemon",
                                   "reuseportctl_version"])
        #expect(dump["reuseportctl_version"] as? String == BuildVersion.string)
        #expect((dump["errors"] as? [Any])?.isEmpty == true)
        #expect(Set(svc.keys) == ["name", "pin_directory", "abi_version", "seed", "bucket_count", "slot_count",
                                  "live_count", "listeners", "global", "socket_diagnostics_error", "slots", "change", "quic",
                                  "upgrade", "generations", "pinned_canary"])
        #expect(svc["pinned_canary"] is NSNull)
        let generations = try #require(svc["generations"] as? [[String: Any]])
        #expect(generations.count == 1, "\(generations)")
        #expect(Set(generations[0].keys) == ["generation", "role", "slots", "buckets", "flows"])
        #expect(generations[0]["generation"] as? Int == 1 && generations[0]["role"] as? String == "working")
        #expect(generations[0]["slots"] as? [Int] == [0, 1, 2, 3] && generations[0]["buckets"] as? Int == 64)
        #expect(generations[0]["flows"] as? Int == 0)
        let change = try #require(svc["change"] as? [String: Any])
        #expect(Set(change.keys) == ["phase", "learning_buckets", "pinned_buckets", "switch_ns", "drain_deadline_ns",
                                     "records", "max_tracked_flows", "record_bytes", "recorded", "untracked",
                                     "untracked_uncounted", "rate_refused", "pinned", "stale", "working_generation",
                                     "last_generation"])
        #expect(change["phase"] as? String == "none" && change["max_tracked_flows"] as? Int == TrackedFlowCount.sized(workers: 4).value)
        #expect(change["working_generation"] as? Int == 1 && change["last_generation"] as? Int == 1)
        #expect(Set(listeners[0].keys) == ["index", "endpoint", "live_slots"])
        #expect(Set(global.keys) == ["dropped_no_slot", "unparsable", "fallbacks", "select_errors", "migrated",
                                     "migrate_failed"])
        #expect(Set(slots[0].keys) == ["slot", "pid", "state", "restarts", "stalls", "watchdog_restarts", "generation",
                                       "since_ns", "seconds_in_state",
                                       "buckets", "packets", "bytes", "fallbacks", "receive_drops", "records", "leaving",
                                       "joining", "sockets", "quic", "notified_status", "health"])
        let socket = try #require((slots[0]["sockets"] as? [[String: Any]])?.first)
        #expect(Set(socket.keys) == ["listener", "cookie", "inode", "receive_drops", "receive_queue"])
    }

    /// The human table, exactly: fixed clock, fixed pids, no traffic on two slots.
    @Test func humanTableIsExact() throws {
        let root = PinRoot("dump-table")
        let service = try PinnedService(root: root, name: "dns", slots: 3, seed: 0xabc, bucketCount: 12)
        let now: UInt64 = 1_800_000_000_000_000_000
        try service.setState(0, pid: 101, state: .running, restarts: 0, since: now - 3725 * 1_000_000_000)
        try service.setState(1, pid: 202, state: .running, restarts: 12, since: now - 45 * 1_000_000_000)
        try service.setState(2, pid: 0, state: .backoff, restarts: 3, since: now - 200_000 * 1_000_000_000)
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let slot = try #require(try sendAndReceive([client], to: service, size: 2000)[client.local])

        // No daemon answers in this run folder: the first line says so, and reuseportctl's version.
        let runDirectory = "/tmp/reuseportctl-test-\(getpid())-nodaemon"
        let result = try reuseportctl(["map", "dump", "--pin-dir", root.path, "--run-dir", runDirectory],
                                      environment: ["REUSEPORTCTL_NOW_NS": "\(now)"])
        #expect(result.status == 0, "\(result)")
        // Only the cookies (and so the width of their column) and the slot the datagram took vary.
        let cookies = try (0..<UInt32(3)).map { "\(try service.cookie($0))" }
        let width = max(6, cookies.map(\.count).max()!)
        func right(_ text: String, _ width: Int) -> String { String(repeating: " ", count: width - text.count) + text }
        func line(_ index: UInt32, _ pid: String, _ state: String, _ restarts: String, _ time: String) -> String {
            let (packets, bytes) = index == slot ? ("1", "2.0 KiB") : ("0", "0 B")
            return ["  " + right("\(index)", 4), right("1", 3), right(pid, 3), state, right(restarts, 8), right(time, 8), right("4", 7),
                    right(packets, 7), right(bytes, 7), right("0", 9), right("0", 5), right("0", 7), "-     ",
                    right(cookies[Int(index)], width)]
                .joined(separator: "  ")
        }
        let expected = """
            daemon     no answer at \(runDirectory)/control.sock (reuseportctl \(BuildVersion.string))

            service dns  (\(root.path)/dns)
              listeners  0: \(service.endpoint)
              seed 0x00000abc  buckets 12  slots 3  live 3  abi \(RP_ABI_VERSION)
              global     dropped_no_slot 0  unparsable 0  fallbacks 0  select_errors 0  migrated 0  migrate_failed 0
              change     none
              generation 1 working (slots 0,1,2)  last 1
              shares     generation 1 12 buckets (100.0%), 0 flows
              flows      records 0 of \(TrackedFlowCount.sized(workers: 3).value) (about 0 B)  recorded 0  untracked 0  untracked_uncounted 0  rate_refused 0  pinned 0  stale 0

              SLOT  GEN  PID  STATE    RESTARTS  IN STATE  BUCKETS  PACKETS    BYTES  FALLBACKS  DROPS  RECORDS  CHANGE  \(right("COOKIE", width))
            \(line(0, "101", "running", "0", "1h02m"))
            \(line(1, "202", "running", "12", "45s"))
            \(line(2, "-", "backoff", "3", "2d07h"))

            """
        #expect(result.stdout == expected)
    }

    /// A socket whose buffer overflows: the DROPS column shows the kernel's count for exactly
    /// that socket, the same number /proc/net/udp reports for its inode.
    @Test func dropsAreTheSocketsOwn() throws {
        let root = PinRoot("dump-drops")
        let service = try PinnedService(root: root, slots: 1, receiveBuffer: 4096)
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        for _ in 0..<200 { try client.send([UInt8](repeating: 0, count: 1000), to: service.endpoint.address) }

        let result = try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path])
        #expect(result.status == 0, "\(result)")
        let dump = try #require(try decodeJSON(result.stdout) as? [String: Any])
        let slot = try #require(((dump["services"] as? [[String: Any]])?.first?["slots"] as? [[String: Any]])?.first)
        let drops = try #require(slot["receive_drops"] as? Int)
        #expect(drops > 0)
        #expect(slot["packets"] as? Int == 200)
        let socket = try #require((slot["sockets"] as? [[String: Any]])?.first)
        let inode = try #require(socket["inode"] as? Int)
        #expect(procNetUDPDrops(inode: inode) == drops)
    }

    /// /proc/net/udp: the last column is drops, the tenth the inode.
    func procNetUDPDrops(inode: Int) -> Int? {
        // Read to the end: procfs reports size 0, and the table can be long on a busy machine.
        guard let file = FileHandle(forReadingAtPath: "/proc/net/udp") else { return nil }
        defer { try? file.close() }
        let text = String(decoding: file.readDataToEndOfFile(), as: UTF8.self)
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ")
            if fields.count >= 13, Int(fields[9]) == inode { return Int(fields[fields.count - 1]) }
        }
        return nil
    }

    /// A service whose records (bpf/records.h) are of a newer version is not read as if they were
    /// this build's: it is named with both versions, the others are shown, and the status is 1.
    @Test func recordsOfANewerVersionAreNotMisread() throws {
        let root = PinRoot("dump-records")
        let good = try PinnedService(root: root, name: "good", slots: 2)
        let newer = try PinnedService(root: root, name: "newer", slots: 2)
        _ = good
        let fd = bpf_obj_get(newer.layout.path(ofShared: RP_MAP_RECORDS_VERSION))
        #expect(fd >= 0)
        var key: UInt32 = 0
        var version = UInt32(RP_RECORDS_VERSION) + 1
        #expect(bpf_map_update_elem(fd, &key, &version, 0) == 0)
        close(fd)

        let table = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(table.status == 1)
        #expect(table.stdout.contains("service good") && !table.stdout.contains("service newer"), "\(table)")
        #expect(table.stderr.contains("cannot read the maps of service 'newer'")
                && table.stderr.contains("records version \(version) (a newer reuseportd's); this build reads version \(RP_RECORDS_VERSION)"),
                "\(table)")
    }

    /// A service whose pins are half gone (a daemon starting or removing it) does not hide the
    /// others: they are shown, the broken one is named, and the status is 1.
    @Test func halfPinnedServiceDoesNotHideTheOthers() throws {
        let root = PinRoot("dump-partial")
        let good = try PinnedService(root: root, name: "good", slots: 2)
        let broken = try PinnedService(root: root, name: "broken", slots: 2)
        _ = good
        #expect(unlink(broken.layout.path(ofShared: RP_MAP_SLOT_STATE)) == 0)

        let table = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(table.status == 1)
        #expect(table.stdout.contains("service good"), "\(table)")
        #expect(table.stderr.contains("cannot read the maps of service 'broken'")
                && table.stderr.contains("\(RP_MAP_SLOT_STATE)"), "\(table)")
        let json = try reuseportctl(["map", "dump", "--json", "--pin-dir", root.path])
        #expect(json.status == 1)
        let dump = try #require(try decodeJSON(json.stdout) as? [String: Any])
        #expect((dump["services"] as? [[String: Any]])?.map { $0["name"] as? String } == ["good"])
        #expect((dump["errors"] as? [[String: Any]])?.count == 1)
        let prometheus = try reuseportctl(["stats", "--prometheus", "--pin-dir", root.path])
        #expect(prometheus.status == 1)
        #expect(prometheus.stdout.contains("service=\"good\""))
    }

    /// Errors say where the tool looked: exit status 1.
    @Test func missingPinsAndServicesAreNamed() throws {
        let root = PinRoot("dump-errors")
        let none = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(none.status == 1)
        #expect(none.stderr.contains("no services pinned under \(root.path)"), "\(none)")

        let service = try PinnedService(root: root, name: "alpha", slots: 1)
        _ = service
        let wrong = try reuseportctl(["map", "dump", "--service", "beta", "--pin-dir", root.path])
        #expect(wrong.status == 1)
        #expect(wrong.stderr == "reuseportctl: error: no service 'beta' under \(root.path); pinned there: alpha\n")
    }
}
