#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Worker supervision on the running kernel, with the real daemon binary and real flows.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct SupervisionTests {
    /// 256 flows send a numbered datagram every 25 ms while each of the 4 workers is
    /// SIGKILLed in turn. Every flow must stay on its slot (the whoami answers say which),
    /// every datagram must be answered (the sockets outlive the workers, so what arrives
    /// while a slot has no worker waits in its socket) except the one a worker may have read
    /// and not yet answered when it was killed, and the replacement must answer.
    @Test func killingEveryWorkerMovesNoFlowAndLosesNoDatagram() throws {
        let daemon = try TestDaemon(
            config: serviceTable("steady", workers: 4, extra: "rcvbuf = 8388608\nfailover_after_ms = 30000"))
        let services = try daemon.waitForWorkers()
        let destination = try udpEndpoint(services, "steady")
        let clients = try Traffic.clients(256, on: .loopbackV4)

        let flows = clients.count
        let roundMs = 25.0
        let warmupRounds = 20, roundsBetweenKills = 20, workers = 4
        let rounds = warmupRounds + workers * roundsBetweenKills + 10
        var slotOfFlow = [UInt32?](repeating: nil, count: flows)
        var misplaced: [String] = []
        var kills: [(slot: UInt32, oldPid: Int32, at: Double)] = []
        var replacementFirstAnswerMs: [UInt32: Double] = [:]
        let numbered = NumberedFlows(clients)

        func drain(until deadline: Double, orAll expected: Int? = nil) throws {
            try numbered.receive(until: deadline, orAll: expected) { flow, seq, reply in
                if let slot = slotOfFlow[flow], slot != reply.slot {
                    misplaced.append("flow \(flow) seq \(seq): slot \(reply.slot), was \(slot)")
                }
                slotOfFlow[flow] = slotOfFlow[flow] ?? reply.slot
                if let kill = kills.last(where: { $0.slot == reply.slot }), reply.pid != kill.oldPid,
                   replacementFirstAnswerMs[reply.slot] == nil
                {
                    // Taken when this test reads the answer: an upper bound when it lags.
                    replacementFirstAnswerMs[reply.slot] = nowMs() - kill.at
                }
            }
        }

        let start = nowMs()
        for round in 0..<rounds {
            try numbered.send(round, to: destination)
            let killIndex = (round - warmupRounds) / roundsBetweenKills
            if round >= warmupRounds, (round - warmupRounds) % roundsBetweenKills == 0, killIndex < workers {
                let slot = UInt32(killIndex)
                let pid = try #require(try daemon.status()[0].slots.first { $0.slot == slot }?.pid)
                kills.append((slot, pid, nowMs()))
                kill(pid, SIGKILL)
            }
            try drain(until: start + Double(round + 1) * roundMs)
        }
        try drain(until: nowMs() + 10_000, orAll: rounds)

        // A datagram can only be lost inside a worker: the one it had read and not yet answered
        // when SIGKILL came. The sockets lose none (kernel drop counters), so at most one per kill.
        var lostPerSlot: [UInt32: Int] = [:]
        for flow in 0..<flows where numbered.answered[flow].count < rounds {
            lostPerSlot[slotOfFlow[flow] ?? UInt32.max, default: 0] += rounds - numbered.answered[flow].count
        }
        let lost = lostPerSlot.values.reduce(0, +)
        let drops = kernelUDPDrops(ports: Set(clients.map(\.local.port) + [destination.port]))
        let latencies = (0..<UInt32(workers)).map { replacementFirstAnswerMs[$0] }
        print("SIGKILL under load: \(flows) flows × \(rounds) datagrams, \(lost) lost (held by a killed worker), "
            + "\(drops) dropped by the kernel, \(misplaced.count) answered by another slot; "
            + "death → replacement's first answer: "
            + latencies.enumerated().map { "slot \($0.offset) \($0.element.map { String(format: "%.1f ms", $0) } ?? "never")" }
                .joined(separator: ", "))
        #expect(drops == 0, "no socket dropped a datagram")
        #expect(lostPerSlot.values.allSatisfy { $0 <= 1 } && lostPerSlot.keys.allSatisfy { $0 < UInt32(workers) },
                "at most the one datagram a killed worker held is lost: \(lostPerSlot)")
        #expect(misplaced.isEmpty, "\(misplaced.prefix(5))")
        #expect(Set(slotOfFlow.compactMap { $0 }).count == workers, "the flows spread over every slot")
        for slot in 0..<UInt32(workers) {
            #expect(replacementFirstAnswerMs[slot] != nil, "slot \(slot)'s replacement answered")
        }
        let after = try daemon.status()[0].slots
        for slot in after {
            #expect(slot.restarts == 1, "slot \(slot.slot) was restarted once")
            #expect(!kills.contains { $0.oldPid == slot.pid }, "slot \(slot.slot) has a new worker")
        }
    }

    /// A worker that fails at once is started again with growing delays; after the failover
    /// limit its buckets serve from live slots; once it starts fine it gets them back.
    @Test func crashLoopBacksOffFailsOverAndRecovers() throws {
        let directory = try TemporaryDirectory()
        let starts = "\(directory.path)/starts"
        let marker = "\(directory.path)/healthy"
        // Slot 1 fails until the marker exists; every start of slot 1 is timestamped.
        let script = """
            if [ "$REUSEPORT_SLOT" = 1 ]; then
              date +%s%N >> \(starts)
              [ -e \(marker) ] || { echo "slot 1 is not ready to serve" >&2; exit 3; }
            fi
            exec \(TestDaemon.builtBinary) worker whoami
            """
        let daemon = try TestDaemon(config: """
            [[service]]
            name = "flaky"
            listen = ["udp://127.0.0.1:0"]
            workers = 3
            exec = ["/bin/sh", "-c", '''\(script)''']
            restart_backoff_min_ms = 50
            restart_backoff_max_ms = 400
            healthy_after_ms = 5000
            ready_after_ms = 300
            failover_after_ms = 800
            # buckets come back at once: FlowTrackingTests covers a restore that keeps live flows
            flow_tracking = false
            """)
        let layout = PinLayout(root: daemon.pinRoot, service: "flaky")
        let services = try daemon.waitFor("slots 0 and 2 running") { services in
            services[0].slots.filter { $0.state == "running" }.map(\.slot) == [0, 2]
        }
        let destination = try udpEndpoint(services, "flaky")
        let maps = try DispatchMaps(pinned: layout)
        // The table the daemon starts with, computed rather than read: on a loaded machine slot 1
        // may already be failed over by the time slots 0 and 2 are running.
        let nominal = BucketAssignment.initial(bucketCount: Int(RP_DEFAULT_BUCKETS), slots: [0, 1, 2])

        // Failover after 800 ms of being down.
        let failing = try daemon.waitFor("slot 1 failed over") { $0[0].slots[1].state == "failed-over" }
        #expect(failing[0].failovers == 1, "the failover is counted")
        let failedOver = try maps.readBuckets()
        #expect(!failedOver.contains(1), "no bucket points at slot 1")
        #expect(BucketAssignment.moved(from: nominal, to: failedOver) == nominal.filter { $0 == 1 }.count,
                "only slot 1's buckets moved")
        #expect(try maps.readSlotState(1).state == WorkerState.failedOver.rawValue, "rp_slot_state says failed-over")
        let clients = try Traffic.clients(300, on: .loopbackV4)
        let during = try Whoami.ask(clients, to: destination)
        #expect(during.allSatisfy { $0 != nil }, "every flow is answered while slot 1 is down")
        #expect(!during.contains { $0?.slot == 1 })

        // The back-off: the delays between starts double from 50 ms up to 400 ms.
        sleepMs(1200)
        let times = try String(contentsOfFile: starts, encoding: .utf8).split(separator: "\n").compactMap { Double($0) }
            .map { $0 / 1_000_000 }
        let gaps = zip(times.dropFirst(), times).map { $0 - $1 }
        print("crash loop: \(times.count) starts in \(Int((times.last ?? 0) - (times.first ?? 0))) ms, gaps "
            + gaps.map { String(format: "%.0f", $0) }.joined(separator: ", ") + " ms")
        let expected: [Double] = [0, 50, 100, 200, 400, 400, 400, 400, 400, 400]
        #expect(times.count >= 4 && times.count <= 14, "backed off: \(times.count) starts in about 2 s")
        for (index, gap) in gaps.enumerated() where index < expected.count {
            #expect(gap >= expected[index] * 0.9, "gap \(index) is \(gap) ms, the back-off is \(expected[index]) ms")
        }
        // What a worker writes to stderr goes to the daemon's log: here the log is what is tested.
        let marked = daemon.log.split(separator: "\n").filter { $0.contains("slot 1 is not ready to serve") }
        #expect(!marked.isEmpty && marked.allSatisfy { $0.contains("service=flaky") && $0.contains("slot=1") },
                "the worker's stderr is in the daemon's log, marked with service and slot")

        // Recovery: the next start succeeds; once ready, the table is the nominal one again.
        _ = FileManager.default.createFile(atPath: marker, contents: nil)
        try daemon.waitFor("slot 1 running", timeoutMs: 30_000) { $0[0].slots[1].state == "running" }
        #expect(try maps.readBuckets() == nominal, "slot 1's buckets came back")
        let after = try Whoami.ask(clients, to: destination)
        #expect(after.allSatisfy { $0 != nil })
        var movedBack = 0
        for (before, now) in zip(during, after) {
            guard let before, let now else { continue }
            if now.slot == 1 { movedBack += 1 } else { #expect(now.slot == before.slot, "a flow of a live slot stayed") }
        }
        #expect(movedBack > 0, "slot 1's flows are served by slot 1 again")
    }
}
