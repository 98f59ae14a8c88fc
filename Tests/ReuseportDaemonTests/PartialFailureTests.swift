#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Synchronization
import Testing

/// Operations that fail half-way on the running kernel, with the real daemon binary: what they
/// did must be undone, so that nothing is left half-changed and the operation can be retried.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct PartialFailureTests {
    /// Sets the daemon's soft limit of open files so that exactly `free` more descriptors fit.
    static func limitDescriptors(of pid: pid_t, free: Int?) throws {
        var soft = "unlimited"
        if let free {
            let open = Set(try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").compactMap { Int($0) })
            var limit = 0
            var left = free
            while left > 0 {
                if !open.contains(limit) { left -= 1 }
                limit += 1
            }
            soft = "\(limit)"
        }
        let hard = try String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8).split(separator: "\n")
            .first { $0.hasPrefix("Max open files") }?.split(separator: " ", omittingEmptySubsequences: true)
        let hardLimit = hard.map { String($0[$0.count - 2]) } ?? "unlimited"
        if soft == "unlimited" { soft = hardLimit }
        let directory = try TemporaryDirectory()
        let child = try spawn(["/usr/bin/prlimit", "--pid", "\(pid)", "--nofile=\(soft):\(hardLimit)"],
                              output: "\(directory.path)/prlimit.log")
        let status = waitExit(child, timeoutMs: 10_000)
        let log = (try? String(contentsOfFile: "\(directory.path)/prlimit.log", encoding: .utf8)) ?? ""
        guard status == 0 else { throw HarnessError("prlimit --nofile=\(soft):\(hardLimit) failed (\(String(describing: status))): \(log)") }
    }

    /// A daemon with one service of `workers` slots whose slot 1 never starts: it fails over
    /// 100 ms after its first exit and waits 10 minutes before its next start.
    static func daemonWithSlotOneDown(_ name: String, workers: Int) throws -> TestDaemon {
        let script = """
            [ "$REUSEPORT_SLOT" = 1 ] && exit 3
            exec \(TestDaemon.builtBinary) worker whoami
            """
        return try TestDaemon(config: """
            [[service]]
            name = "\(name)"
            listen = ["udp://127.0.0.1:0"]
            workers = \(workers)
            exec = ["/bin/sh", "-c", '''\(script)''']
            restart_backoff_min_ms = 600000
            restart_backoff_max_ms = 600000
            failover_after_ms = 100
            ready_after_ms = 100
            # the immediate path: FlowTrackingTests covers changes that learn and drain
            flow_tracking = false
            """)
    }

    /// A scale that runs out of file descriptors while binding the new slots' sockets fails,
    /// and leaves the service as it was: the same slots, the sockets it did bind out of the
    /// arrays, and a failed-over slot still failed over (its buckets on live slots). Once
    /// descriptors are there again, the same scale succeeds.
    @Test func aScaleThatFailsHalfWayChangesNothingAndCanBeRetried() throws {
        let daemon = try PartialFailureTests.daemonWithSlotOneDown("partial", workers: 2)
        let services = try daemon.waitFor("slot 0 running, slot 1 failed over") { services in
            services[0].slots.map(\.state) == ["running", "failed-over"]
        }
        let destination = try udpEndpoint(services, "partial")
        sleepMs(300)  // the dead workers' output pipes reach their end and close
        let failedOver = try pinnedBuckets(daemon, service: "partial")
        try #require(!failedOver.contains(1), "slot 1's buckets are on slot 0")

        // Room for the control connection and two sockets: slots 2 and 3 bind, slot 4 cannot.
        try PartialFailureTests.limitDescriptors(of: daemon.pid, free: 3)
        let failed = try daemon.request(ControlRequest(command: .scale, service: "partial", workers: 6))
        try PartialFailureTests.limitDescriptors(of: daemon.pid, free: nil)
        try #require(!failed.ok, "the scale ran out of descriptors: \(failed)")
        print("scale with no descriptors left: \(failed.error ?? "")")

        let after = try daemon.status()[0]
        #expect(after.workers == 2 && after.slots.map(\.slot) == [0, 1], "still slots 0 and 1")
        #expect(try pinnedBuckets(daemon, service: "partial") == failedOver,
                "the bucket table is the one before the scale: slot 1 is still failed over")
        let layout = PinLayout(root: daemon.pinRoot, service: "partial")
        let array = try SocketArray(pinned: layout, listener: 0)
        #expect(try array.liveSlots(below: Int(RP_MAX_SLOTS)) == [0, 1], "no socket of the failed scale is left in the array")

        // The same scale, with descriptors: it succeeds, and slot 1 stays failed over.
        let retried = try daemon.request(ControlRequest(command: .scale, service: "partial", workers: 6))
        #expect(retried.ok, "the scale succeeds once descriptors are there: \(retried.error ?? "")")
        try daemon.waitFor("slots 0 and 2 to 5 running") { services in
            services[0].slots.filter { $0.state == "running" }.map(\.slot) == [0, 2, 3, 4, 5]
        }
        let table = try pinnedBuckets(daemon, service: "partial")
        #expect(!table.contains(1), "slot 1 is still failed over: no bucket names it")
        #expect(Set(table) == [0, 2, 3, 4, 5], "every live slot has buckets")
        let clients = try Traffic.clients(100, on: .loopbackV4)
        let replies = try Whoami.ask(clients, to: destination)
        #expect(replies.allSatisfy { $0 != nil && $0!.slot != 1 }, "every flow is answered by a live slot")
    }

    /// While slot 1 is failed over (no worker, its buckets on live slots), scaling the service
    /// must never point a bucket at slot 1 again, not even for a moment: what arrives there
    /// waits for a worker that is not coming. The program's own counter for slot 1 says whether
    /// a single datagram was steered there while clients send during the scales.
    @Test func scalingNeverSteersToAFailedOverSlot() throws {
        let daemon = try PartialFailureTests.daemonWithSlotOneDown("failed", workers: 4)
        let services = try daemon.waitFor("slots 0, 2, 3 running, slot 1 failed over") { services in
            services[0].slots.map(\.state) == ["running", "failed-over", "running", "running"]
        }
        let destination = try udpEndpoint(services, "failed")
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "failed"))
        try #require(!(try maps.readBuckets()).contains(1))
        let before = try maps.slotCounters(1).packets

        // Clients send from another thread for as long as the scales take.
        let clients = try Traffic.clients(128, on: .loopbackV4)
        let sending = Atomic<Bool>(true)
        let sent = Atomic<Int>(0)
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) let senders = clients
        DispatchQueue.global().async {
            while sending.load(ordering: .relaxed) {
                for client in senders { try? client.send(Array("x".utf8), to: destination) }
                sent.add(senders.count, ordering: .relaxed)
            }
            done.signal()
        }
        for workers in [6, 3, 5] {
            let response = try daemon.request(ControlRequest(command: .scale, service: "failed", workers: workers))
            #expect(response.ok, "scale to \(workers): \(response.error ?? "")")
        }
        sending.store(false, ordering: .relaxed)
        done.wait()
        let steered = try maps.slotCounters(1).packets - before
        print("scales 4 → 6 → 3 → 5 with slot 1 failed over: \(sent.load(ordering: .relaxed)) datagrams sent, "
            + "\(steered) steered to slot 1")
        #expect(steered == 0, "no datagram was steered to the failed-over slot 1")
        #expect(!(try maps.readBuckets()).contains(1), "slot 1 is still failed over")
    }
}
