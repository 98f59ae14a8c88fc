#if canImport(Glibc)
import Glibc
#endif
import ReuseportDaemon
import ReuseportKit
import Testing

/// The configuration parser and the restart policy, in process (no root needed).
struct ConfigurationTests {
    @Test func theEmbeddedDemoIsValid() throws {
        let configuration = try Daemon.loadConfiguration(path: nil)
        #expect(configuration.services.count == 1)
        let demo = configuration.services[0]
        #expect(demo.name == "demo" && demo.workers == 4 && demo.program == .builtin(.whoami))
        #expect(demo.listen == [try Endpoint(parsing: "udp://127.0.0.1:5300")])
    }

    @Test func everyKeyIsRead() throws {
        let configuration = try ConfigurationParser.parse("""
            stop_timeout_ms = 1500
            [[service]]
            name = "full"
            listen = ["udp://[::1]:0", "tcp://0.0.0.0:0"]
            workers = 3
            exec = ["/bin/server", "-v"]
            user = "nobody"
            group = 0
            rcvbuf = 65536
            buckets = 64
            seed = 4294967295
            restart_backoff_min_ms = 5
            restart_backoff_max_ms = 50
            healthy_after_ms = 700
            ready_after_ms = 70
            failover_after_ms = 900
            flow_tracking = false
            flow_idle_timeout_ms = 2500
            max_tracked_flows = 4096
            max_new_flows_per_second = 500
            drain_timeout_ms = 60000
            notify = true
            ready_timeout_ms = 20000
            drain_signal = "SIGUSR2"
            preload_bind = true
            """, file: "full.toml")
        #expect(configuration.stopTimeoutMs == 1500)
        let service = configuration.services[0]
        #expect(service.program == .exec(["/bin/server", "-v"]))
        #expect(service.user == "nobody" && service.group == "0")
        #expect(service.receiveBuffer == 65536 && service.bucketCount == 64 && service.seed == UInt32.max)
        #expect(service.restart == RestartPolicy(backoffMinimumMs: 5, backoffMaximumMs: 50, healthyAfterMs: 700,
                                                 readyAfterMs: 70))
        #expect(service.failoverAfterMs == 900)
        #expect(service.tracking == ServiceDataPlane.FlowTracking(enabled: false, idleTimeoutMs: 2500, maxFlows: 4096,
                                                                  recordsPerSecond: 500, drainTimeoutMs: 60000))
        #expect(service.notify && service.readyTimeoutMs == 20000 && service.drainSignal == SIGUSR2)
        #expect(service.preloadBind && service.workerDefinition.preloadBind)
    }

    /// Without the keys: tracking on, 60 s idle timeout, 262,144 records, new records bounded to
    /// the table's size over one learning window (4,369 a second), a one-hour drain limit.
    @Test func flowTrackingDefaults() throws {
        let service = try ConfigurationParser.parse("""
            [[service]]
            name = "d"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            builtin = "echo"
            """, file: "d.toml").services[0]
        #expect(service.tracking == ServiceDataPlane.FlowTracking())
        #expect(service.tracking.enabled && service.tracking.idleTimeoutMs == 60_000
                    && service.tracking.maxFlows == nil && service.tracking.recordsPerSecond == nil
                    && service.tracking.effectiveRecordsPerSecond == 4297 && service.tracking.drainTimeoutMs == 3_600_000)
    }

    /// docs/configuration.md: by default a spray of new tuples while a change learns cannot fill
    /// the table before the window ends. The program's bucket starts with one second of credit
    /// and earns one second a second (bpf/dispatch.bpf.c, take_record_credit), so a window of W
    /// seconds records at most rate × (W + 1): that must not exceed `max_tracked_flows`, small
    /// tables included (1,000 records and a 10 s window filled in about a second at a floor of
    /// 1,000 a second).
    @Test(arguments: [(1000, 10_000), (256, 1000), (262_144, 60_000), (4096, 2500), (100_000, 100), (50, 60_000)])
    func theDefaultRateCannotFillTheTableBeforeTheWindowEnds(maxFlows: Int, idleMs: Int) throws {
        let tracking = try ConfigurationParser.parse("""
            [[service]]
            name = "d"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            builtin = "echo"
            max_tracked_flows = \(maxFlows)
            flow_idle_timeout_ms = \(idleMs)
            """, file: "d.toml").services[0].tracking
        let rate = tracking.effectiveRecordsPerSecond
        let mostRecorded = rate * (idleMs + 1000) / 1000
        // The one exception, documented: a table of fewer records than the window has seconds
        // (plus one) gets the least bound there is, 1 a second.
        #expect(rate >= 1 && (mostRecorded <= maxFlows || (rate == 1 && maxFlows < (idleMs + 1000) / 1000)),
                "\(maxFlows) records, \(idleMs) ms: \(rate)/s records up to \(mostRecorded) in the window")
        // Not far below either: the bound is the table spread over the window.
        #expect(mostRecorded >= maxFlows - (idleMs + 1000) / 1000 || rate == 1, "\(rate)/s, \(mostRecorded)")
        if maxFlows == 1000 && idleMs == 10_000 { #expect(rate == 90) }
    }

    /// `watchdog_ms` is 0 (off) or at least 100 ms: a worker cannot answer a 1 ms watchdog.
    @Test func theWatchdogHasAFloor() throws {
        func watchdog(_ value: Int) throws -> Int {
            try ConfigurationParser.parse("""
                [[service]]
                name = "d"
                listen = ["udp://127.0.0.1:0"]
                workers = 1
                builtin = "echo"
                watchdog_ms = \(value)
                """, file: "d.toml").services[0].watchdogMs
        }
        #expect(try watchdog(0) == 0)
        #expect(try watchdog(100) == 100)
        #expect(try watchdog(30_000) == 30_000)
        for value in [1, 50, 99] {
            let error = #expect(throws: ConfigurationError.self) { try watchdog(value) }
            #expect(error?.description.hasPrefix("d.toml: service[0].watchdog_ms: must be 0 (off) or at least 100 "
                + "milliseconds, got \(value)") == true, "\(error.map { "\($0)" } ?? "")")
        }
    }

    @Test(arguments: [
        ("name = 5", "service[0].name: must be a string, not integer"),
        ("name = \"a/b\"", "service[0].name: 'a/b' is not a valid service name"),
        ("listen = []", "service[0].listen: is empty"),
        ("listen = [\"quic://1.2.3.4:5\"]", "service[0].listen[0]: 'quic://1.2.3.4:5': unknown scheme 'quic'"),
        ("listen = [\"udp://::1:53\"]", "service[0].listen[0]"),
        ("workers = 1025", "service[0].workers: must be between 1 and 1024, got 1025"),
        ("workers = 2.5", "service[0].workers: must be an integer"),
        ("builtin = \"cat\"", "service[0].builtin: unknown built-in worker 'cat'"),
        ("exec = []", "service[0].exec: is empty"),
        ("exec = [\"/bin/x\"]", "service[0].exec: and builtin are both set"),
        ("buckets = 2", "service[0].buckets: 2 buckets cannot spread over 3 workers"),
        ("restart_backoff_max_ms = 10", "service[0].restart_backoff_max_ms: (10) is below restart_backoff_min_ms (100)"),
        ("failover_after_ms = -1", "service[0].failover_after_ms: must be between 0 and 86400000"),
        ("group = \"no-such-group-here\"", "service[0].group: no such group"),
        ("flow_tracking = \"yes\"", "service[0].flow_tracking: must be true or false, not string"),
        ("flow_idle_timeout_ms = 50", "service[0].flow_idle_timeout_ms: must be at least 100 milliseconds, got 50"),
        ("max_tracked_flows = 0", "service[0].max_tracked_flows: must be between 1 and 16777216, got 0"),
        ("max_tracked_flows = 16777217", "service[0].max_tracked_flows: must be between 1 and 16777216"),
        ("max_new_flows_per_second = -1", "service[0].max_new_flows_per_second: must be between 0 (no bound)"),
        ("drain_timeout_ms = 86400001", "service[0].drain_timeout_ms: must be between 0 and 86400000"),
        ("watchdog_ms = 1", "service[0].watchdog_ms: must be 0 (off) or at least 100 milliseconds, got 1"),
        ("notify = 1", "service[0].notify: must be true or false, not integer"),
        ("ready_timeout_ms = 0", "service[0].ready_timeout_ms: must be at least 1"),
        ("drain_signal = \"SIGTERM\"", "service[0].drain_signal: 'SIGTERM' is not a signal a worker may get to start "
            + "draining: use \"none\" or one of SIGCONT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH"),
        ("preload_bind = 1", "service[0].preload_bind: must be true or false, not integer"),
        ("preload_bind = true", "service[0].preload_bind: applies to an exec program that binds its own sockets; a "
            + "built-in worker serves the sockets it is given"),
    ])
    func eachMistakeIsNamed(line: String, expected: String) throws {
        var keys = ["name = \"s\"", "listen = [\"udp://127.0.0.1:0\"]", "workers = 3", "builtin = \"echo\""]
        let key = line.split(separator: " ")[0]
        keys.removeAll { $0.hasPrefix("\(key) ") || (line == "exec = []" && $0.hasPrefix("builtin ")) }
        let text = "[[service]]\n" + (keys + [line]).joined(separator: "\n") + "\n"
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(text, file: "t.toml") }
        #expect(error?.description.hasPrefix("t.toml: \(expected)") == true, "\(error.map { "\($0)" } ?? "")")
    }

    @Test func serviceNamesAndAddressesAreUnique() {
        let service = { (name: String, listen: String) in
            "[[service]]\nname = \"\(name)\"\nlisten = [\"\(listen)\"]\nworkers = 1\nbuiltin = \"echo\"\n"
        }
        let sameName = #expect(throws: ConfigurationError.self) {
            try ConfigurationParser.parse(service("a", "udp://127.0.0.1:1") + service("a", "udp://127.0.0.1:2"), file: "f")
        }
        #expect(sameName?.key == "service[1].name")
        // Same port, other transport or another specific address: allowed.
        #expect(throws: Never.self) {
            try ConfigurationParser.parse(service("a", "udp://127.0.0.1:9") + service("b", "tcp://127.0.0.1:9")
                + service("c", "udp://127.0.0.2:9") + service("d", "udp://[::]:9"), file: "f")
        }
        let wildcard = #expect(throws: ConfigurationError.self) {
            try ConfigurationParser.parse(service("a", "udp://[::1]:9") + service("b", "udp://[::]:9"), file: "f")
        }
        #expect(wildcard?.key == "service[1].listen[0]")
    }

    @Test func missingServicesAndUnknownTopLevelKeys() {
        let none = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse("", file: "f") }
        #expect(none?.description == "f: service: no service: add at least one [[service]] table")
        let unknown = #expect(throws: ConfigurationError.self) {
            try ConfigurationParser.parse("stop_timeout = 5\n", file: "f")
        }
        #expect(unknown?.key == "stop_timeout")
    }

    @Test func backOffDoublesFromTheMinimumToTheMaximum() {
        let policy = RestartPolicy(backoffMinimumMs: 100, backoffMaximumMs: 1000)
        #expect((0..<7).map { policy.delayMs(afterQuickExits: $0) } == [0, 100, 200, 400, 800, 1000, 1000])
        #expect(policy.delayMs(afterQuickExits: 500) == 1000, "no overflow")
    }

    @Test func aHealthyRunResetsTheBackOff() {
        let policy = RestartPolicy(backoffMinimumMs: 100, backoffMaximumMs: 1000, healthyAfterMs: 5000)
        var quickExits = 0
        var delays: [Int] = []
        for lived in [10, 10, 10, 10, 6000, 10, 4999] {
            let next = policy.afterExit(livedMs: lived, quickExits: quickExits)
            delays.append(next.delayMs)
            quickExits = next.quickExits
        }
        // The exit after the healthy 6 s run is restarted at once, and the count starts over.
        #expect(delays == [0, 100, 200, 400, 0, 100, 200])
    }

    /// A worker killed by a signal after it was ready did start: no quick exit, restarted at
    /// once, the count starts over. Killed before it was ready, it is a quick exit as before.
    @Test func aSignalAfterReadyIsNotAQuickExit() {
        let policy = RestartPolicy(backoffMinimumMs: 100, backoffMaximumMs: 1000, healthyAfterMs: 5000,
                                   readyAfterMs: 500)
        #expect(policy.afterExit(livedMs: 600, quickExits: 4, killedBySignal: true) == (0, 0))
        #expect(policy.afterExit(livedMs: 600, quickExits: 4, killedBySignal: false) == (800, 5))
        #expect(policy.afterExit(livedMs: 100, quickExits: 2, killedBySignal: true) == (200, 3))
    }

    /// Jitter only lengthens a back-off, by at most a quarter, and spreads equal ones apart.
    @Test func jitterLengthensByAtMostAQuarter() {
        var random = SystemRandomNumberGenerator()
        let delays = (0..<200).map { _ in RestartPolicy.jittered(1000, using: &random) }
        #expect(delays.allSatisfy { (1000...1250).contains($0) })
        #expect(Set(delays).count > 50, "spread")
        #expect(RestartPolicy.jittered(0, using: &random) == 0)
    }
}
