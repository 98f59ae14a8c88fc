#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Foundation
import ReuseportControl
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import SystemPackage
import Testing

/// Active health checks: the pure parts in process (the source port that reaches a slot, the
/// decisions, the rate bound, the configuration), then probes through the shared port of a real
/// daemon, with whoami and with Debian's unbound as workers.
struct HealthCheckDecisionTests {
    static let settings = HealthCheckSettings(payload: Array("ping".utf8), expectPrefix: Array("slot=".utf8),
                                              intervalMs: 200, timeoutMs: 100, failures: 3, transport: .udp)

    /// For every slot, the chosen source port's flow lands on it by the program's own hash and
    /// tables (SteeringSnapshot mirrors rp_dispatch), for UDP and TCP, IPv4 and IPv6.
    @Test(arguments: [(Transport.udp, "127.0.0.1"), (.tcp, "::1"), (.udp, "::1"), (.tcp, "127.0.0.1")])
    func theSourcePortLandsOnTheSlot(transport: Transport, address: String) throws {
        let local = IPAddress(address)!
        let slots = (0..<UInt32(6)).map { $0 }
        let snapshot = SteeringSnapshot(seed: 0x5eed, slotCount: 6,
                                        buckets: BucketAssignment.initial(bucketCount: 4096, slots: slots),
                                        liveSlots: Set(slots))
        let destination = SocketAddress(local, 5353)
        for slot in slots {
            let port = try #require(ProbeAddressing.sourcePort(
                reaching: slot, transport: transport, from: local, to: destination, in: snapshot,
                ports: ProbeAddressing.candidatePorts(for: slot)))
            let flow = FlowTuple(transport, from: SocketAddress(local, port), to: destination)
            #expect(snapshot.placement(of: flow).slot == slot)
        }
    }

    /// A pinned bucket with a record for the flow sends it where the record says; the probe
    /// follows the record, and a bucket without a record follows the table.
    @Test func aRecordInAPinnedBucketDecides() throws {
        let local = IPAddress.loopbackV4
        let destination = SocketAddress(local, 5353)
        var buckets = BucketAssignment.initial(bucketCount: 256, slots: [0, 1])
        buckets = buckets.map { $0 | UInt32(RP_BUCKET_PINNED) }
        let snapshot = SteeringSnapshot(seed: 7, slotCount: 2, buckets: buckets, liveSlots: [0, 1, 2])
        let recorded = FlowTuple(.udp, from: SocketAddress(local, 20_000), to: destination)
        let recordSlot: (FlowTuple) -> UInt32? = { $0 == recorded ? 2 : nil }
        #expect(ProbeAddressing.landingSlot(of: recorded, in: snapshot, recordSlot: recordSlot) == 2)
        #expect(ProbeAddressing.sourcePort(reaching: 2, transport: .udp, from: local, to: destination, in: snapshot,
                                           ports: [20_000, 20_001], recordSlot: recordSlot) == 20_000)
        // Slot 2 holds no bucket: no other port reaches it.
        #expect(ProbeAddressing.sourcePort(reaching: 2, transport: .udp, from: local, to: destination, in: snapshot,
                                           ports: Array(20_001..<24_000), recordSlot: recordSlot) == nil)
    }

    @Test func aWildcardListenerIsProbedOverLoopbackAndAForeignOneIsNot() {
        let any4 = SocketAddress(IPAddress("0.0.0.0")!, 53)
        #expect(ProbeAddressing.route(to: any4) { _ in false }?.to == SocketAddress(.loopbackV4, 53))
        let any6 = SocketAddress(IPAddress("::")!, 53)
        #expect(ProbeAddressing.route(to: any6) { _ in false }?.from == .loopbackV6)
        let foreign = SocketAddress(IPAddress("192.0.2.1")!, 53)
        #expect(ProbeAddressing.route(to: foreign) { _ in false } == nil)
        #expect(Supervisor.isLocalAddress(.loopbackV4))
        #expect(!Supervisor.isLocalAddress(IPAddress("192.0.2.1")!))
    }

    /// `failures` failed probes in a row restart the worker; a passed probe starts the count
    /// again; a probe that did not reach the slot counts for nothing; a slot unhealthy through
    /// restarts for failover_after_ms fails over.
    @Test func failuresInARowRestartThenFailOver() {
        var health = SlotHealth()
        let s = Self.settings
        let ms: Int64 = 1_000_000
        #expect(health.record(.failed("x"), pid: 10, now: 0, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.record(.failed("x"), pid: 10, now: 200 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.record(.passed, pid: 10, now: 400 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.record(.unreached("y"), pid: 10, now: 500 * ms, settings: s, failoverAfterMs: 1000) == .none)
        for step in 0..<2 {
            #expect(health.record(.failed("x"), pid: 10, now: Int64(600 + step * 200) * ms, settings: s,
                                  failoverAfterMs: 1000) == .none)
        }
        #expect(health.record(.failed("x"), pid: 10, now: 1000 * ms, settings: s, failoverAfterMs: 1000) == .restart)
        #expect(health.condemned == 10 && health.restarts == 1 && !health.isHealthy)
        // The replacement fails too, for failover_after_ms since the first restart.
        #expect(health.record(.failed("x"), pid: 11, now: 1600 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.record(.failed("x"), pid: 11, now: 1800 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.record(.failed("x"), pid: 11, now: 2000 * ms, settings: s, failoverAfterMs: 1000)
            == .restartAndFailOver)
        #expect(health.failovers == 1 && health.failed == 8 && health.unreached == 1 && health.passed == 1)
        // A new worker's counts start again; one passed probe makes the slot healthy.
        #expect(health.record(.failed("x"), pid: 12, now: 2500 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.consecutiveFailures == 1)
        #expect(health.record(.passed, pid: 12, now: 2700 * ms, settings: s, failoverAfterMs: 1000) == .none)
        #expect(health.isHealthy)
    }

    /// At most `maxProbesPerSecond` a service: the interval stretches with the slot count.
    @Test func theProbeRateIsBounded() {
        let s = Self.settings
        #expect(s.effectiveIntervalMs(slots: 4) == 200)
        #expect(s.effectiveIntervalMs(slots: 100) == 1000)
        #expect(s.effectiveIntervalMs(slots: 1024) == 10_240)
        for slots in [1, 7, 20, 21, 64, 1024] {
            let perSecond = Double(slots) * 1000 / Double(s.effectiveIntervalMs(slots: slots))
            #expect(perSecond <= Double(HealthCheckSettings.maxProbesPerSecond))
        }
        #expect(s.detectionBoundMs(slots: 4) == 700)
    }

    @Test func answersAreJudgedByPrefixAndRegex() {
        var s = Self.settings
        #expect(s.accepts(Array("slot=1 pid=2".utf8)))
        #expect(!s.accepts(Array("nope".utf8)))
        s.expectRegex = "pid=[0-9]+"
        #expect(s.accepts(Array("slot=1 pid=2".utf8)))
        #expect(!s.accepts(Array("slot=1 pid=x".utf8)))
    }

    static func parse(_ table: String, listen: String = "udp://127.0.0.1:0") throws -> HealthCheckSettings? {
        try ConfigurationParser.parse("""
            [[service]]
            name = "d"
            listen = ["\(listen)"]
            workers = 2
            builtin = "whoami"

            [service.health_check]
            \(table)
            """, file: "d.toml").services[0].healthCheck
    }

    @Test func theConfigurationIsRead() throws {
        let hex = try #require(try Self.parse("""
            send_hex = "1234 0100"
            expect_hex = "1234"
            interval_ms = 500
            timeout_ms = 200
            failures = 2
            """))
        #expect(hex.payload == [0x12, 0x34, 0x01, 0x00] && hex.expectPrefix == [0x12, 0x34])
        #expect(hex.intervalMs == 500 && hex.timeoutMs == 200 && hex.failures == 2 && hex.transport == .udp)
        // The example of docs/configuration.md ("Active health checks") is the query the unbound
        // test sends.
        let documented = try #require(try Self.parse("""
            send_hex = "4843 0100 0001 0000 0000 0000 0474657374 076578616d706c65 00 0010 0001"
            """))
        #expect(documented.payload == UnboundUpgradeTests.query(id: 0x4843))
        let tcp = try #require(try Self.parse("send = \"ping\\n\"\nexpect_regex = \"^slot=\"",
                                              listen: "tcp://[::1]:0"))
        #expect(tcp.transport == .tcp && tcp.timeoutMs == 500 && tcp.expectRegex == "^slot=")
    }

    @Test(arguments: [
        ("expect = \"x\"", "d.toml:7: service[0].health_check.send: is required (or send_hex)"),
        ("send = \"a\"\nsend_hex = \"61\"", "d.toml:9: service[0].health_check.send_hex: give send or send_hex, not both"),
        ("send_hex = \"zz\"", "d.toml:8: service[0].health_check.send_hex: 'zz' is not hex octets"),
        ("send = \"a\"\ninterval_ms = 50", "d.toml:9: service[0].health_check.interval_ms: must be at least 100"),
        ("send = \"a\"\ninterval_ms = 200\ntimeout_ms = 200",
         "d.toml:10: service[0].health_check.timeout_ms: must be at least 1 and below interval_ms (200)"),
        ("send = \"a\"\nfailures = 0", "d.toml:9: service[0].health_check.failures: must be between 1 and 100, got 0"),
        ("send = \"a\"\nexpect_regex = \"(\"", "d.toml:9: service[0].health_check.expect_regex: '(' is not a regular"),
        ("send = \"a\"\ntransport = \"tcp\"", "d.toml:9: service[0].health_check.transport: the service has no tcp://"),
        ("send = \"a\"\nport = 1", "d.toml:9: service[0].health_check.port: unknown key"),
    ])
    func badSettingsAreNamedWithTheirLine(table: String, expected: String) {
        let error = #expect(throws: ConfigurationError.self) { try Self.parse(table) }
        #expect(error?.description.hasPrefix(expected) == true, "\(error.map { "\($0)" } ?? "no error")")
    }
}

/// Probes through the shared port of a real daemon. The tests with probes of 150 ms that count
/// failures exactly run alone: a CPU shared with other tests' daemons can delay an answer past that.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct HealthCheckTests {
    static func healthTable(_ lines: String) -> String {
        "\n[service.health_check]\n" + lines
    }

    /// Waits until every slot of the first service passed `count` probes.
    static func waitForPasses(_ daemon: TestDaemon, _ count: Int, _ what: String = "every slot passes probes") throws
        -> [ServiceStatus]
    {
        try daemon.waitFor(what) { services in
            services[0].slots.allSatisfy { ($0.health?.passed ?? 0) >= count }
        }
    }

    /// Every slot is probed through the shared port and passes: the program sent each probe to
    /// its slot (unreached 0: every probe grew its slot's rp_slot_stats counter, and nothing else
    /// sends here). UDP on a specific IPv4 address, on a specific IPv6 one and on the IPv6
    /// wildcard, TCP on the IPv6 wildcard and on a specific IPv4 address.
    @Test(.alone, arguments: [("udp://127.0.0.1:0", "send = \"ping\"\nexpect = \"slot=\""),
                      ("udp://[::1]:0", "send = \"ping\"\nexpect = \"slot=\""),
                      ("udp://[::]:0", "send = \"ping\"\nexpect = \"slot=\""),
                      ("tcp://[::]:0", "send = \"ping\\n\"\nexpect_regex = \"^slot=[0-9]+ pid=\""),
                      ("tcp://127.0.0.1:0", "send = \"ping\\n\"\nexpect_regex = \"^slot=[0-9]+ pid=\"")])
    func everySlotIsReachedThroughTheSharedPort(listen: String, check: String) throws {
        let daemon = try TestDaemon(config: serviceTable("hc", listen: [listen], workers: 4, extra: Self.healthTable(
            check + "\ninterval_ms = 200\ntimeout_ms = 150\nfailures = 3")))
        _ = try daemon.waitForWorkers()
        let services = try Self.waitForPasses(daemon, 3)
        for slot in services[0].slots {
            let health = try #require(slot.health)
            #expect(health.unreached == 0 && health.failed == 0 && health.unaddressable == 0, "\(slot)")
            #expect(health.healthy && health.restarts == 0)
        }
        #expect(daemon.stop() == 0)
    }

    /// A worker that stops answering (SIGSTOP) is found after `failures` failed probes and
    /// restarted at its slot; the other slots' flows are answered by the same workers throughout.
    @Test(.alone) func aStoppedWorkerIsRestartedAndTheOtherSlotsLoseNothing() throws {
        let daemon = try TestDaemon(config: serviceTable("hc", workers: 4, extra: Self.healthTable("""
            send = "ping"
            expect = "slot="
            interval_ms = 200
            timeout_ms = 150
            failures = 3
            """)))
        let before = try Self.waitForPasses(daemon, 2)
        let destination = try udpEndpoint(before, "hc")
        let victim = try #require(before[0].slots.first { $0.slot == 1 }?.pid)
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let first = try Whoami.ask(clients, to: destination)
        let others = clients.indices.filter { first[$0] != nil && first[$0]!.slot != 1 }
        #expect(others.count > 32)
        let started = nowMs()
        try Syscall.kill(victim, SIGSTOP)
        var rounds = 0
        var lost = 0
        var moved = 0
        let after = try daemon.waitFor("slot 1 restarted for its health") { services in
            // Flows of the other slots, every round: answered, and by the same worker.
            rounds += 1
            let answers = (try? Whoami.ask(others.map { clients[$0] }, to: destination, attempts: 1)) ?? []
            for (position, index) in others.enumerated() {
                guard position < answers.count, let answer = answers[position] else { lost += 1; continue }
                if answer.slot != first[index]!.slot || answer.pid != first[index]!.pid { moved += 1 }
            }
            guard let slot = services[0].slots.first(where: { $0.slot == 1 }) else { return false }
            return slot.health?.restarts == 1 && slot.pid != nil && slot.pid != victim
        }
        let detectedMs = nowMs() - started
        let slot = try #require(after[0].slots.first { $0.slot == 1 })
        let health = try #require(slot.health)
        #expect(health.failed == 3, "\(health)")
        #expect(health.lastProblem?.hasPrefix("no answer within 150 ms") == true, "\(health)")
        #expect(lost == 0 && moved == 0, "rounds \(rounds): \(lost) answers lost, \(moved) moved")
        // The stopped worker got SIGABRT and SIGCONT (its backtrace may take seconds), SIGKILL
        // at the stop timeout: it is gone, reaped by the daemon.
        let gone = nowMs() + 15_000
        while processExists(victim) && nowMs() < gone { sleepMs(100) }
        #expect(!processExists(victim), "the stopped worker pid \(victim) still exists")
        // The replacement passes its probes, at the same slot.
        let healed = try daemon.waitFor("slot 1 passes again") { services in
            (services[0].slots.first { $0.slot == 1 }?.health?.passed ?? 0) > health.passed
        }
        #expect(healed[0].slots.first { $0.slot == 1 }?.health?.healthy == true)
        // reuseportctl shows it: map dump (human and JSON) and the metrics.
        let locations = ["--pin-dir", daemon.pinRoot, "--run-dir", daemon.runDirectory]
        let ctl = BuiltProducts.path("reuseportctl")
        let human = try Subprocess.run(ctl, ["map", "dump"] + locations).output
        let row = human.split(separator: "\n").first { $0.contains("health checks") }
        #expect(row != nil, "\(human)")
        let json = try Subprocess.run(ctl, ["map", "dump", "--json"] + locations).output
        let dump = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        let dumped = ((dump?["services"] as? [[String: Any]])?.first?["slots"] as? [[String: Any]])?
            .first { $0["slot"] as? Int == 1 }?["health"] as? [String: Any]
        #expect(dumped?["restarts"] as? Int == 1 && dumped?["failed"] as? Int == 3, "\(json)")
        let metrics = try Subprocess.run(ctl, ["stats", "--prometheus"] + locations).output
        #expect(metrics.contains("reuseport_slot_health_restarts_total{service=\"hc\",slot=\"1\"} 1"), "\(metrics)")
        // Measured, not asserted (no timed assertions): the test's own polling adds to it.
        print("health check: SIGSTOP found and the worker replaced after \(Int(detectedMs)) ms "
            + "(interval 200 × failures 3 + timeout 150 = 750 ms)")
        #expect(daemon.stop() == 0)
    }

    /// Health checks restart for the workers a new daemon adopts (after its own `reexec`, or
    /// SIGKILL and a new daemon on the same pins): every adopted slot passes probes again, and an
    /// adopted worker that stops answering is restarted for its health. Each slot's failure
    /// streak starts from zero in the new process (documented: a streak is the daemon's memory,
    /// not the kernel's), so it takes `failures` new failed probes.
    @Test(.alone, arguments: ["reexec", "kill"])
    func adoptedWorkersAreProbedAgain(restart: String) throws {
        let config = serviceTable("hc", workers: 3, extra: Self.healthTable("""
            send = "ping"
            expect = "slot="
            interval_ms = 200
            timeout_ms = 150
            failures = 3
            """))
        let first = try TestDaemon(config: config)
        let before = try Self.waitForPasses(first, 2)
        let pids = before[0].slots.map(\.pid)
        var second: TestDaemon?
        if restart == "reexec" {
            let started = try first.request(ControlRequest(command: .status)).daemon?.startedAtNs
            #expect(try first.request(ControlRequest(command: .reexec)).ok)
            _ = try first.waitFor("the new image") { _ in
                (try? first.request(ControlRequest(command: .status)).daemon?.startedAtNs) != started
            }
        } else {
            first.signal(SIGKILL)
            #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
            second = try TestDaemon(config: config, pinRoot: first.pinRoot)
        }
        let daemon = second ?? first
        let adopted = try Self.waitForPasses(daemon, 2, "every adopted slot passes probes again")
        #expect(adopted[0].slots.map(\.pid) == pids, "the same workers, adopted")
        let victim = try #require(adopted[0].slots.first { $0.slot == 1 }?.pid)
        try Syscall.kill(victim, SIGSTOP)
        let after = try daemon.waitFor("the adopted worker of slot 1 restarted for its health") { services in
            guard let slot = services[0].slots.first(where: { $0.slot == 1 }) else { return false }
            return slot.health?.restarts == 1 && slot.pid != nil && slot.pid != victim
        }
        #expect(after[0].slots.first { $0.slot == 1 }?.health?.failed == 3)
        #expect(daemon.stop() == 0)
        withExtendedLifetime(first) {}
    }

    /// Debian's unbound as the worker, a DNS query as the probe: SIGSTOP one unbound, and it is
    /// replaced; the other slots' queries are all answered.
    @Test(.alone, .enabled(if: access(unboundPath, X_OK) == 0, "Debian's unbound is not installed: `make test` installs it"))
    func aStoppedUnboundIsReplaced() throws {
        let folder = try TemporaryDirectory()
        let port = try freePort()
        let conf = try folder.write("unbound.conf", UnboundUpgradeTests.unboundConfig(port: port, answer: "healthy",
                                                                                      directory: folder.path))
        // The query `test.example. TXT` with id 0x4843; a healthy answer has that id and QR set.
        let query = UnboundUpgradeTests.query(id: 0x4843).map { String(format: "%02x", $0) }.joined()
        let daemon = try TestDaemon(
            config: serviceTable("dns", listen: ["udp://127.0.0.1:\(port)"], workers: 3,
                                 program: "exec = [\"\(unboundPath)\", \"-d\", \"-p\", \"-c\", \"\(conf)\"]",
                                 extra: "notify = true\n" + Self.healthTable("""
                                     send_hex = "\(query)"
                                     expect_hex = "4843"
                                     expect_regex = "healthy"
                                     interval_ms = 300
                                     timeout_ms = 200
                                     failures = 2
                                     """)),
            launcher: UnboundUpgradeTests.systemdHost + TestDaemon.defaultLauncher)
        let before = try Self.waitForPasses(daemon, 2, "every unbound answers its probes")
        let victim = try #require(before[0].slots.first { $0.slot == 0 }?.pid)
        let destination = SocketAddress(.loopbackV4, port)
        let live = try UnboundUpgradeTests.Queries(64)
        try Syscall.kill(victim, SIGSTOP)
        var rounds = 0
        var unanswered = 0
        let clients = live.clients
        // Which flows go to slot 0 is read from the pinned tables, as `reuseportctl which` does.
        let layout = PinLayout(root: daemon.pinRoot, service: "dns")
        let snapshot = try SteeringSnapshot(maps: try DispatchMaps(pinned: layout),
                                            sockets: try SocketArray(pinned: layout, listener: 0))
        let elsewhere = clients.indices.filter {
            snapshot.placement(of: FlowTuple(.udp, from: clients[$0].local, to: destination)).slot != 0
        }
        #expect(!elsewhere.isEmpty && elsewhere.count < clients.count)
        let started = nowMs()
        let after = try daemon.waitFor("unbound of slot 0 replaced") { services in
            rounds += 1
            try? live.round(to: destination, answerPrefix: "health")
            guard let slot = services[0].slots.first(where: { $0.slot == 0 }) else { return false }
            return slot.health?.restarts == 1 && slot.pid != nil && slot.pid != victim
        }
        print("health check: SIGSTOP unbound found and replaced after \(Int(nowMs() - started)) ms "
            + "(interval 300 × failures 2 + timeout 200 = 800 ms), \(rounds) rounds of 64 queries")
        for index in elsewhere where live.answered[index].count < live.rounds { unanswered += 1 }
        #expect(unanswered == 0, "\(unanswered) of \(elsewhere.count) flows of the other slots lost answers")
        #expect(after[0].slots.first { $0.slot == 0 }?.health?.failed == 2)
        _ = try daemon.waitFor("the new unbound passes") { services in
            services[0].slots.first { $0.slot == 0 }?.health?.healthy == true
        }
        #expect(daemon.stop() == 0)
    }
}
