#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// What the daemon tells the service manager that started it (sd_notify(3)), read from a real
/// Unix datagram socket given to a real daemon as its `NOTIFY_SOCKET`, as systemd would. The
/// same sequence under a real systemd is `make systemd-test` (Tests/systemd-vm).
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ServiceManagerTests {
    /// The service manager's end: a bound datagram socket, and what arrived on it.
    final class NotifyReceiver {
        /// A path, or "@name" for the abstract namespace.
        let address: String
        let socket: OwnedDescriptor
        private(set) var messages: [(atMs: Double, text: String)] = []
        /// The descriptors passed along with each message (SCM_RIGHTS), by message index.
        private(set) var descriptors: [Int: [OwnedDescriptor]] = [:]
        private var directory: TemporaryDirectory?

        init(abstract: Bool) throws {
            if abstract {
                address = "@reuseportd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            } else {
                let directory = try TemporaryDirectory()
                address = "\(directory.path)/notify"
                self.directory = directory
            }
            socket = try Syscall.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), nonBlocking: true, "notify receiver")
            try Syscall.bind(socket.fd, unixPath: address)
        }

        deinit { socket.close() }

        /// Reads until a message satisfies `condition` (returned) or `timeoutMs` passes (nil).
        @discardableResult
        func waitFor(timeoutMs: Int = 30_000, _ condition: (String) -> Bool) throws -> String? {
            let deadline = nowMs() + Double(timeoutMs)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while nowMs() < deadline {
                _ = try Syscall.poll([socket.fd], timeoutMs: Int32(max(1, min(50, deadline - nowMs()))))
                while let (count, passed) = try Syscall.receiveWithDescriptors(socket.fd, into: &buffer) {
                    let text = String(decoding: buffer[0..<min(count, buffer.count)], as: UTF8.self)
                    if !passed.isEmpty { descriptors[messages.count] = passed }
                    messages.append((nowMs(), text))
                    if condition(text) { return text }
                }
            }
            return nil
        }

        /// Every message so far that has `assignment` as one of its lines, with what was passed along.
        func passing(_ assignment: String) -> [(text: String, descriptors: [OwnedDescriptor])] {
            messages.indices.filter { ServiceManagerTests.has(messages[$0].text, assignment) }
                .map { (messages[$0].text, descriptors[$0] ?? []) }
        }

        /// Every message so far that has `assignment` as one of its lines.
        func with(_ assignment: String) -> [String] {
            messages.map(\.text).filter { $0.split(separator: "\n").contains(Substring(assignment)) }
        }
    }

    static func has(_ message: String, _ assignment: String) -> Bool {
        message.split(separator: "\n").contains(Substring(assignment))
    }

    static func status(_ message: String) -> String? {
        message.split(separator: "\n").first { $0.hasPrefix("STATUS=") }.map { String($0.dropFirst(7)) }
    }

    static func config(workers: Int, readyAfterMs: Int = 300) -> String {
        serviceTable("sm", workers: workers, extra: "ready_after_ms = \(readyAfterMs)")
    }

    @Test("READY=1 comes once, only when every slot has a running worker, and STATUS= counts them")
    func readyWhenEverySlotRuns() throws {
        let receiver = try NotifyReceiver(abstract: true)
        let started = nowMs()
        let daemon = try TestDaemon(config: Self.config(workers: 3, readyAfterMs: 600),
                                    environment: ["NOTIFY_SOCKET": receiver.address])
        let ready = try #require(try receiver.waitFor { Self.has($0, "READY=1") },
                                 "no READY=1; log: \(daemon.logTail(10))")
        let readyAtMs = nowMs() - started
        // A worker counts as running after ready_after_ms: READY=1 cannot come earlier.
        #expect(readyAtMs >= 600, "READY=1 after \(readyAtMs) ms")
        let services = try daemon.status()
        #expect(services.allSatisfy { $0.slots.allSatisfy { $0.state == "running" && $0.pid != nil } }, "\(services)")
        #expect(Self.status(ready) == "1 service, 3/3 workers running")
        // Before it, STATUS= lines only, none of them with every worker running.
        let before = receiver.messages.dropLast().map(\.text)
        #expect(!before.isEmpty && before.allSatisfy { !Self.has($0, "READY=1") && !$0.contains("3/3") }, "\(before)")
        try receiver.waitFor(timeoutMs: 300) { _ in false }
        #expect(receiver.with("READY=1").count == 1)
        #expect(daemon.stop() == 0)
    }

    @Test("a reload sends RELOADING=1 with MONOTONIC_USEC= then READY=1, also when it is refused")
    func reloadingThenReady() throws {
        let receiver = try NotifyReceiver(abstract: false)
        let daemon = try TestDaemon(config: Self.config(workers: 2), environment: ["NOTIFY_SOCKET": receiver.address])
        try #require(try receiver.waitFor { Self.has($0, "READY=1") } != nil, "no READY=1; log: \(daemon.logTail(10))")

        // SIGHUP with a changed file: the unit is reloading until the change is applied.
        try daemon.rewriteConfig(Self.config(workers: 3))
        let asked = MonotonicClock.nanoseconds() / 1000
        daemon.signal(SIGHUP)
        let reloading = try #require(try receiver.waitFor { Self.has($0, "RELOADING=1") })
        let stamp = try #require(reloading.split(separator: "\n").first { $0.hasPrefix("MONOTONIC_USEC=") }
            .flatMap { Int64($0.dropFirst(15)) }, "\(reloading)")
        #expect(stamp >= asked && stamp <= MonotonicClock.nanoseconds() / 1000,
                "MONOTONIC_USEC=\(stamp), asked at \(asked)")
        let done = try #require(try receiver.waitFor { Self.has($0, "READY=1") })
        #expect(Self.status(done)?.contains("last: reloaded: sm: 3 workers") == true, "\(done)")
        // The change was applied when READY=1 was sent.
        #expect(try daemon.status().first?.slots.count == 3)

        // A file that does not parse: refused, and still READY=1, with STATUS= saying why.
        try daemon.rewriteConfig("[[service]\n")
        let response = try daemon.request(ControlRequest(command: .reload))
        #expect(!response.ok)
        try #require(try receiver.waitFor { Self.has($0, "RELOADING=1") } != nil)
        let refused = try #require(try receiver.waitFor { Self.has($0, "READY=1") })
        #expect(Self.status(refused)?.contains("last: reload refused: the configuration is invalid") == true,
                "\(refused)")
        #expect(daemon.stop() == 0)
    }

    @Test("SIGTERM sends STOPPING=1, then the daemon stops every worker as before")
    func stoppingOnSIGTERM() throws {
        let receiver = try NotifyReceiver(abstract: true)
        let daemon = try TestDaemon(config: Self.config(workers: 2), environment: ["NOTIFY_SOCKET": receiver.address])
        try #require(try receiver.waitFor { Self.has($0, "READY=1") } != nil, "no READY=1; log: \(daemon.logTail(10))")
        let pids = try daemon.status().flatMap { $0.slots.compactMap(\.pid) }
        daemon.signal(SIGTERM)
        let stopping = try #require(try receiver.waitFor { Self.has($0, "STOPPING=1") })
        #expect(Self.status(stopping)?.contains("stopping") == true, "\(stopping)")
        #expect(daemon.waitForExit(timeoutMs: 15_000) == 0)
        #expect(pids.count == 2 && pids.allSatisfy { !processExists($0) })
        #expect(access(daemon.pinRoot + "/sm", F_OK) != 0, "the pins are removed")
    }

    @Test("WATCHDOG=1 every half of WATCHDOG_USEC; none when WATCHDOG_PID names another process")
    func watchdogPings() throws {
        let receiver = try NotifyReceiver(abstract: true)
        let daemon = try TestDaemon(config: Self.config(workers: 1),
                                    environment: ["NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000"])
        try #require(try receiver.waitFor { Self.has($0, "READY=1") } != nil, "no READY=1; log: \(daemon.logTail(10))")
        let from = receiver.with("WATCHDOG=1").count
        try receiver.waitFor(timeoutMs: 2000) { _ in false }
        // 2 s at one ping per 200 ms: 10, give or take a loaded machine.
        let pings = receiver.with("WATCHDOG=1").count - from
        #expect((8...11).contains(pings), "\(pings) pings in 2 s")
        #expect(daemon.stop() == 0)

        let other = try NotifyReceiver(abstract: true)
        let notOurs = try TestDaemon(config: Self.config(workers: 1),
                                     environment: ["NOTIFY_SOCKET": other.address, "WATCHDOG_USEC": "400000",
                                                   "WATCHDOG_PID": "1"])
        try #require(try other.waitFor { Self.has($0, "READY=1") } != nil, "no READY=1; log: \(notOurs.logTail(10))")
        try other.waitFor(timeoutMs: 1000) { _ in false }
        #expect(other.with("WATCHDOG=1").isEmpty)
        #expect(notOurs.stop() == 0)
    }
}
