#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The daemon keeps serving whatever its workers and operators do: a worker that floods its
/// output, a daemon out of file descriptors, a datagram too large to echo.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ResilienceTests {
    /// A worker writes 100 MB of output as fast as it can beside a 2-worker whoami service.
    /// Throughout, `status` is answered within 100 ms, the other service's workers come up, the
    /// lines over the log's rate limit are counted as dropped on the chatty slot, and SIGTERM
    /// stops the daemon.
    @Test(.alone) func aChattyWorkerStarvesNothingElse() throws {
        let daemon = try TestDaemon(
            config: serviceTable("chatty", workers: 1,
                                 program: #"exec = ["/bin/sh", "-c", "yes | head -c 100000000; exec sleep 300"]"#)
                + serviceTable("quiet", workers: 2),
            logLevel: "info")
        // Only once the control socket exists (the daemon binds it before starting workers).
        try daemon.waitFor("the control socket", timeoutMs: 10_000) { _ in true }
        let control = ControlClient(runDirectory: daemon.runDirectory, timeoutSeconds: 2)
        var latencies: [Double] = []
        var failures: [String] = []
        var last: [ServiceStatus] = []
        for _ in 0..<20 {
            let start = nowMs()
            do {
                let response = try control.send(ControlRequest(command: .status))
                latencies.append(nowMs() - start)
                last = response.services ?? []
            } catch {
                failures.append("\(error) after \(Int(nowMs() - start)) ms")
            }
            sleepMs(200)
        }
        let worst = latencies.max() ?? .infinity
        print("status latency over \(latencies.count) answers: worst \(String(format: "%.1f", worst)) ms, "
              + "median \(String(format: "%.1f", latencies.sorted().dropFirst(latencies.count / 2).first ?? .infinity)) ms")
        #expect(failures.isEmpty, "unanswered: \(failures); \(daemon.logTail())")
        #expect(latencies.count == 20 && worst < 100, "status latencies \(latencies.map { Int($0) }) ms")
        let quiet = last.first { $0.name == "quiet" }
        #expect(quiet?.slots.map(\.state) == ["running", "running"], "quiet: \(String(describing: quiet))")
        let chatty = last.first { $0.name == "chatty" }?.slots.first
        #expect((chatty?.droppedOutputLines ?? 0) > 0, "chatty: \(String(describing: chatty))")
        #expect((chatty?.droppedOutputBytes ?? 0) >= 2 * (chatty?.droppedOutputLines ?? 0))
        // Still writing at the end: its output is rate-limited, not read to the end already.
        let later = try daemon.status().first { $0.name == "chatty" }?.slots.first?.droppedOutputLines ?? 0
        #expect(later > (chatty?.droppedOutputLines ?? 0), "drops still grow: \(later)")
        #expect(daemon.log.contains("of this worker's output: more than 1000 lines a second"), "\(daemon.logTail())")
        #expect(daemon.stop(timeoutMs: 10_000) == 0, "SIGTERM stops it: \(daemon.logTail())")
    }

    /// With RLIMIT_NOFILE just above what the daemon holds (set on the running daemon, as `ulimit -n`
    /// would: room for the 13 new slots' sockets and little more), `scale 15` (as many slots as
    /// the maps of 2 workers hold, 16, allow) is answered
    /// with the slots that could not start and why; then 2 idle control connections take the
    /// last descriptors and a `status` request waits in the backlog. The daemon must not spin
    /// (< 5 % CPU over 2 s, from utime + stime in /proc/PID/stat), must log the limit once, and
    /// must answer the waiting request once the idle connections close.
    @Test func outOfFileDescriptorsTheDaemonWaitsInsteadOfSpinning() throws {
        let daemon = try TestDaemon(config: serviceTable("many", workers: 2, extra: """
            flow_tracking = false
            # Slots that cannot start wait a minute before they try again, and are not failed
            # over: nothing but the control socket acts while the test measures.
            restart_backoff_min_ms = 60000
            restart_backoff_max_ms = 60000
            failover_after_ms = 600000
            """), logLevel: "info")
        try daemon.waitForWorkers()
        // The limit follows what the daemon holds (its maps' fds grow with the ABI): room for one
        // socket per new slot (and a few more), not for their workers' pipes.
        let limit = openDescriptors(daemon.pid) + 16
        // prlimit(2) is not in Swift's Glibc module (a GNU extension): util-linux's prlimit(1) calls it.
        let prlimit = try Subprocess.run("/usr/bin/prlimit", ["--pid", "\(daemon.pid)", "--nofile=\(limit):"],
                                         captureStandardError: true)
        try #require(prlimit.status == .exited(0), "prlimit --nofile=\(limit): on the daemon: \(prlimit.errors)")

        let scaled = try daemon.request(ControlRequest(command: .scale, service: "many", workers: 15))
        #expect(scaled.ok, "\(scaled)")
        let failures = scaled.startFailures ?? []
        print("scale 15 under RLIMIT_NOFILE \(limit): \(scaled.message ?? "-"); \(openDescriptors(daemon.pid)) fds open")
        #expect(!failures.isEmpty, "a slot cannot start with \(limit) descriptors: \(scaled)")
        for failure in failures {
            #expect(failure.error.contains("Too many open files (errno \(EMFILE))"), "\(failure)")
            #expect(scaled.message?.contains("slot \(failure.slot) could not start") == true, "\(scaled)")
        }

        // Take what is left: idle clients until the daemon cannot accept one, which it says in its
        // log (counting its descriptors instead was flaky: a failed worker start frees some of its
        // own at the same moment, so a first refusal may pass; the loop waits for one that lasts).
        var idle: [Int32] = []
        defer { for fd in idle { close(fd) } }
        func lastControlLine() -> Substring? { daemon.log.split(separator: "\n").last { $0.contains("control: ") } }
        func refusing() -> Bool { lastControlLine()?.contains("cannot accept clients") == true }
        while idle.count < 16 {
            if refusing() {
                sleepMs(300)
                if refusing() { break }
            }
            // Accepted (one more descriptor) or refused, usually within milliseconds: the loop
            // must end well within the daemon's 5 s request timeout, after which it drops the
            // first idle clients and would have descriptors again.
            let before = openDescriptors(daemon.pid)
            idle.append(try daemon.connectControl())
            let deadline = nowMs() + 1000
            while !refusing(), openDescriptors(daemon.pid) == before, nowMs() < deadline { sleepMs(10) }
        }
        try #require(refusing(), "the daemon ran out of descriptors for clients: \(daemon.logTail())")
        let waiting = try daemon.connectControl()
        defer { close(waiting) }
        let request = Array(#"{"command":"status"}"#.utf8) + [0x0a]
        #expect(request.withUnsafeBytes { write(waiting, $0.baseAddress, $0.count) } == request.count)

        let logged = daemon.log.utf8.count
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let cpuBefore = try cpuTicks(daemon.pid), start = nowMs()
        sleepMs(2000)
        let cpu = Double(try cpuTicks(daemon.pid) - cpuBefore) / ticks / ((nowMs() - start) / 1000)
        print("daemon CPU while out of descriptors: \(String(format: "%.1f", cpu * 100)) % "
              + "(\(idle.count) idle clients held)")
        #expect(cpu < 0.05, "the daemon spins: \(cpu * 100) % CPU; \(daemon.logTail())")
        // Logged once when it started, not at every retry (every 250 ms) while it lasts.
        let meanwhile = String(decoding: daemon.log.utf8.dropFirst(logged), as: UTF8.self)
        let repeated = meanwhile.split(separator: "\n").filter { $0.contains("control: ") }
        #expect(repeated.isEmpty, "nothing logged again while it waited: \(repeated)")
        #expect(lastControlLine()?.contains("limit of \(limit) open descriptors (RLIMIT_NOFILE") == true,
                "\(String(describing: lastControlLine()))")

        for fd in idle { close(fd) }
        idle.removeAll()
        var answer: [UInt8] = []
        let deadline = nowMs() + 5000
        while !answer.contains(0x0a), nowMs() < deadline {
            var entry = pollfd(fd: waiting, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 100) > 0 else { continue }
            var buffer = [UInt8](repeating: 0, count: 65536)
            let count = buffer.withUnsafeMutableBytes { read(waiting, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            answer += buffer[0..<count]
        }
        let response = try? ControlFraming.decode(ControlResponse.self, from: Data(answer.prefix { $0 != 0x0a }))
        #expect(response?.ok == true && response?.services?.first?.workers == 15,
                "the waiting status is answered: \(String(decoding: answer.prefix(200), as: UTF8.self))")
        #expect(daemon.log.contains("control: accepting clients again"), "\(daemon.logTail())")
    }

    /// A 65,507-byte datagram (the largest over IPv4) gets a whoami answer of 65,507 bytes: the
    /// start of the payload, and the header says how much was left out.
    @Test func whoamiAnswersTheLargestDatagram() throws {
        let daemon = try TestDaemon(config: serviceTable("big", workers: 1))
        let services = try daemon.waitForWorkers()
        let destination = try udpEndpoint(services, "big")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let payload = (0..<65_507).map { UInt8(truncatingIfNeeded: $0 % 251) }
        let reply = try #require(try Whoami.ask([client], to: destination, payload: { _ in payload })[0],
                                 "no answer to 65,507 bytes; \(daemon.logTail())")
        #expect(reply.truncated > 0)
        #expect(reply.payload.count + reply.truncated == payload.count)
        #expect(reply.payload[...] == payload.prefix(reply.payload.count))
        let header = "slot=\(reply.slot) pid=\(reply.pid) service=big peer=\(reply.peer) truncated=\(reply.truncated)\n"
        #expect(header.utf8.count + reply.payload.count == 65_507, "the answer fills one datagram")

        // A datagram that fits is echoed whole, without the field.
        let small = try #require(try Whoami.ask([client], to: destination, payload: { _ in Array("hello".utf8) })[0])
        #expect(small.truncated == 0 && small.payload == Array("hello".utf8))
    }
}

/// The descriptors `pid` holds open.
private func openDescriptors(_ pid: pid_t) -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
}

/// utime + stime of `pid` in clock ticks (proc(5): fields 14 and 15 of /proc/PID/stat).
private func cpuTicks(_ pid: pid_t) throws -> Int {
    let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
    // Fields after the command, which may hold spaces and ends at the last ')': state is field 3.
    let fields = stat[stat.index(after: try #require(stat.lastIndex(of: ")")))...].split(separator: " ")
    return (Int(fields[14 - 3]) ?? 0) + (Int(fields[15 - 3]) ?? 0)
}
