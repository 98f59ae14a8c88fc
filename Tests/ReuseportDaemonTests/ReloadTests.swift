#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Reloads that rebuild a service, or cannot, while flows send: make-before-break, and a
/// refused reload changes nothing.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ReloadTests {
    /// What the flows saw around one reload: the daemon's answer, and per flow the datagrams
    /// answered and the slot of each answer.
    struct Run {
        var response: ControlResponse
        var sent: Int
        var answered: [Set<Int>]
        /// Per flow: the slot of the first answer and of the last.
        var firstSlot: [UInt32?]
        var lastSlot: [UInt32?]
        var lost: Int { answered.reduce(0) { $0 + (sent - $1.count) } }
        var moved: Int { zip(firstSlot, lastSlot).filter { $0 != nil && $0 != $1 }.count }
    }

    /// Every `roundMs` each flow sends `"<flow> <round>"` to a whoami service: `before` rounds,
    /// then a `reload` request on the control socket with the rounds going on until it is
    /// answered (the daemon is busy meanwhile: nothing waits for it), then `after` rounds; then
    /// waits up to 10 s for every answer.
    static func reloadUnderTraffic(_ daemon: TestDaemon, _ clients: [FlowClient], to destination: SocketAddress,
                                   roundMs: Double = 25, before: Int = 10, after: Int = 10) throws -> Run {
        var answered = [Set<Int>](repeating: [], count: clients.count)
        var firstSlot = [UInt32?](repeating: nil, count: clients.count)
        var lastSlot = [UInt32?](repeating: nil, count: clients.count)
        var fds = clients.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
        func drain(until deadline: Double, all expected: Int? = nil) throws {
            while nowMs() < deadline {
                if let expected, answered.allSatisfy({ $0.count >= expected }) { return }
                guard poll(&fds, nfds_t(fds.count), Int32(max(0, min(20, deadline - nowMs())))) > 0 else { continue }
                for flow in clients.indices where fds[flow].revents & Int16(POLLIN) != 0 {
                    fds[flow].revents = 0
                    while let bytes = try clients[flow].receive(timeoutMs: 0) {
                        guard let reply = WhoamiReply(bytes) else { continue }
                        let fields = String(decoding: reply.payload, as: UTF8.self).split(separator: " ")
                        guard fields.count == 2, let round = Int(fields[1]) else { continue }
                        answered[flow].insert(round)
                        firstSlot[flow] = firstSlot[flow] ?? reply.slot
                        lastSlot[flow] = reply.slot
                    }
                }
            }
        }
        var round = 0
        func sendRound() throws {
            for (flow, client) in clients.enumerated() { try client.send(Array("\(flow) \(round)".utf8), to: destination) }
            round += 1
        }
        let start = nowMs()
        for _ in 0..<before {
            try sendRound()
            try drain(until: start + Double(round) * roundMs)
        }
        let control = try daemon.connectControl()
        defer { close(control) }
        let request = try ControlFraming.encode(ControlRequest(command: .reload))
        _ = request.withUnsafeBytes { write(control, $0.baseAddress, $0.count) }
        var line = Data()
        var reply = pollfd(fd: control, events: Int16(POLLIN), revents: 0)
        let giveUp = nowMs() + 30_000
        while !line.contains(0x0a) {
            guard nowMs() < giveUp else { throw HarnessError("no answer to reload in 30 s; log:\n\(daemon.log)") }
            try sendRound()
            try drain(until: start + Double(round) * roundMs)
            while !line.contains(0x0a), poll(&reply, 1, 0) > 0 {
                var buffer = [UInt8](repeating: 0, count: 65536)
                let count = read(control, &buffer, buffer.count)
                guard count > 0 else { throw HarnessError("the control socket closed; log:\n\(daemon.log)") }
                line.append(contentsOf: buffer[0..<count])
            }
        }
        let response = try ControlFraming.decode(ControlResponse.self, from: line)
        let resumed = nowMs()
        for index in 1...after {
            try sendRound()
            try drain(until: resumed + Double(index) * roundMs)
        }
        try drain(until: nowMs() + 10_000, all: round)
        return Run(response: response, sent: round, answered: answered, firstSlot: firstSlot, lastSlot: lastSlot)
    }

    /// A reload that must rebuild a service and cannot (its new port is taken) changes nothing:
    /// the old port answers every datagram through it and after it, status and pins are as
    /// they were, and the refusal says why (in the answer and in the log).
    @Test func aReloadThatCannotBeAppliedChangesNothing() throws {
        let daemon = try TestDaemon(config: serviceTable("rf", workers: 2))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "rf")
        // A plain socket (no SO_REUSEPORT) holds the port the file now asks for.
        let holder = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try daemon.rewriteConfig(serviceTable("rf", listen: ["udp://127.0.0.1:\(holder.local.port)"], workers: 2))
        let clients = try Traffic.clients(32, on: .loopbackV4)

        let run = try ReloadTests.reloadUnderTraffic(daemon, clients, to: destination)

        print("refused reload under traffic: \(clients.count) flows × \(run.sent) datagrams, \(run.lost) lost; "
            + "answer: \(run.response.error ?? "-")")
        #expect(!run.response.ok)
        #expect(run.response.error?.contains("nothing changed") == true, "\(run.response)")
        #expect(run.response.error?.contains("Address already in use") == true, "\(run.response)")
        #expect(run.lost == 0, "every datagram answered by the old service")
        let after = try daemon.status()
        #expect(after == before, "status unchanged: \(after)")
        #expect(PinLayout.services(under: daemon.pinRoot) == ["rf"], "the pins are intact")
        #expect(try pinnedBuckets(daemon, service: "rf").count == 4096)
        #expect(daemon.log.contains("reload (control): the configuration cannot be applied, nothing changed: "
            + "service rf: "), "\(daemon.logTail(10))")
        #expect(!daemon.log.contains("service rf stopped"), "\(daemon.logTail(10))")
    }

    /// A seed change rebuilds the service make-before-break: new sockets join the group, new
    /// workers start on them, the new program is attached (one switch), then the old workers
    /// go. No datagram is lost; the answer reports the share of flows that moved, and the
    /// flows' own moves agree with it.
    @Test(.alone) func aSeedChangeUnderTrafficLosesNoDatagram() throws {
        let daemon = try TestDaemon(config: serviceTable("rf", workers: 4, extra: "seed = 1"))
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "rf")
        let oldPids = Set(before[0].slots.compactMap(\.pid))
        try daemon.rewriteConfig(serviceTable("rf", workers: 4, extra: "seed = 2"))
        let clients = try Traffic.clients(64, on: .loopbackV4)

        let run = try ReloadTests.reloadUnderTraffic(daemon, clients, to: destination)

        let message = run.response.message ?? ""
        print("seed change under traffic: \(clients.count) flows × \(run.sent) datagrams, \(run.lost) lost, "
            + "\(run.moved) flows moved; answer: \(message)")
        #expect(run.response.ok, "\(run.response)")
        #expect(run.lost == 0, "no datagram lost")
        // "reloaded: rebuilt rf (74.8% of flows moved to another slot)"
        let reported = try #require(message.split(separator: "(").last?.split(separator: "%").first.flatMap { Double($0) },
                                    "the answer reports the share of flows moved: \(message)")
        #expect(message.hasPrefix("reloaded: rebuilt rf ("), "\(message)")
        // Four even slots, independent seeds: about 3/4 move. 64 flows give the test's own count
        // a standard deviation of about 5.4 points.
        #expect(abs(reported - 75) < 5, "reported \(reported)%")
        #expect(abs(Double(run.moved) / Double(clients.count) * 100 - reported) < 20,
                "\(run.moved) of \(clients.count) flows moved, reported \(reported)%")
        let after = try daemon.waitForWorkers()
        #expect(after[0].listeners == before[0].listeners, "the same port")
        #expect(Set(after[0].slots.compactMap(\.pid)).isDisjoint(with: oldPids), "new workers")
        #expect(PinLayout.services(under: daemon.pinRoot) == ["rf"])
        let config = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "rf")).readConfig()
        #expect(config.seed == 2, "the new maps are pinned")
        let deadline = nowMs() + 20_000
        while oldPids.contains(where: processExists) && nowMs() < deadline { sleepMs(20) }
        #expect(!oldPids.contains(where: processExists), "the old workers exited")
    }

    /// The daemon's resident memory (VmRSS in /proc/PID/status), in kB.
    static func residentKB(_ pid: pid_t) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kB = Int(line.split(separator: " ")[1])
        else { throw HarnessError("no VmRSS in /proc/\(pid)/status") }
        return kB
    }

    /// Reloads do not grow the daemon. Parsing TOML in process leaked about 2 kB per reload
    /// (toml++ tables TOMLKit never frees), linearly: 1200 reloads after the warm-up would add
    /// about 2.4 MB, more than twice the 1 MB allowed, so a leak of half that size is still
    /// caught. (The issue's 10,000 take minutes here: each reload now starts a child.)
    @Test func reloadsKeepTheDaemonsMemoryFlat() throws {
        let daemon = try TestDaemon(config: serviceTable("rf", workers: 2), logLevel: "warning")
        _ = try daemon.waitForWorkers()
        let reload = ControlRequest(command: .reload)
        for _ in 0..<200 { #expect(try daemon.request(reload).ok) }
        let warm = try ReloadTests.residentKB(daemon.pid)
        let count = 1200
        let start = nowMs()
        var refused = 0
        for _ in 0..<count where try !daemon.request(reload).ok { refused += 1 }
        let elapsed = nowMs() - start
        let after = try ReloadTests.residentKB(daemon.pid)
        print("\(count) reloads in \(Int(elapsed)) ms (\(String(format: "%.1f", elapsed / Double(count))) ms each): "
            + "RSS \(warm) kB → \(after) kB (\(after - warm) kB, "
            + String(format: "%.2f", Double(after - warm) / Double(count)) + " kB per reload)")
        #expect(refused == 0)
        #expect(after - warm < 1024, "RSS grew \(after - warm) kB over \(count) reloads")
        #expect(try daemon.status()[0].slots.count == 2, "still serving")
    }

    /// `scale 6` (a control request), then the file says `workers = 6` and one more listener, and
    /// a reload rebuilds the service while the scale's change still drains. A rebuild takes the
    /// bucket table the running plane has, its flow records and the change in progress: every
    /// live flow keeps its slot through it (the table of a fresh build, spread evenly over 6
    /// slots, differs from the one a 4 → 6 change made), the records of the draining change go
    /// on steering their flows, and the change ends once they are idle. The same after `scale 3`:
    /// the leaving slot keeps its socket and gets a worker in the new plane, and the flows its
    /// records hold stay there until idle. And after `scale 6` with a file that still says 4:
    /// the rebuild keeps the 6 slots, then the file's count applies as a scale that keeps live
    /// flows too.
    @Test(arguments: [(6, 6), (3, 3), (6, 4)])
    func aRebuildAfterAScaleMovesNoLiveFlow(scaled: Int, workers: Int) throws {
        func config(_ listen: [String], workers: Int) -> String {
            serviceTable("rb", listen: listen, workers: workers, extra: """
                rcvbuf = 8388608
                flow_idle_timeout_ms = 1000
                """)
        }
        let daemon = try TestDaemon(config: config(["udp://127.0.0.1:0"], workers: 4))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "rb")
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "rb"))
        // Labelled by slot only: a rebuild starts new workers on every slot.
        let sessions = try Sessions(128) { "\($0.slot)" }
        try sessions.run(3, to: destination)
        let scale = try daemon.request(ControlRequest(command: .scale, service: "rb", workers: scaled))
        #expect(scale.ok, "\(scale)")
        // The change learns for the idle timeout, then switches and drains while the flows send.
        var round = 0
        while try maps.readTransition().phase != RP_TRANSITION_DRAINING.rawValue {
            try sessions.run(1, to: destination)
            round += 1
            guard round < 100 else { throw HarnessError("the scale never switched; log:\n\(daemon.logTail(20))") }
        }
        try sessions.run(2, to: destination)
        let tableBefore = try maps.readBuckets()
        let recordsBefore = try FlowRecords.count(maps)

        try daemon.rewriteConfig(config(["udp://127.0.0.1:0", "udp://[::1]:0"], workers: workers))
        var response: ControlResponse?
        var rebuilt: DispatchMaps?
        var recordsAfter = 0
        var tableAfter: [UInt32] = []
        try sessions.run(10, to: destination) { round in
            guard response == nil else { return }
            response = try daemon.request(ControlRequest(command: .reload))
            // The new plane's pins, read at once (a scale to the file's count, if any, learns
            // before its buckets move; records stay until their flows idle).
            let pinned = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "rb"))
            recordsAfter = try FlowRecords.count(pinned)
            tableAfter = try pinned.readBuckets()
            rebuilt = pinned
        }
        let newMaps = try #require(rebuilt)
        let movedBuckets = zip(tableBefore, tableAfter).filter { $0 != $1 }.count
        let changed = sessions.moved.count
        print("rebuild (workers = \(workers)) after scale 4 → \(scaled): \(response?.message ?? response?.error ?? "-"); \(changed) of 128 live flows "
            + "changed slot, \(sessions.lost) datagrams lost; \(movedBuckets) of \(tableBefore.count) buckets on another "
            + "slot; \(recordsBefore) records before, \(recordsAfter) after")
        #expect(response?.ok == true, "\(String(describing: response))")
        #expect(response?.message?.contains("moved to another slot") == false, "\(String(describing: response))")
        #expect(sessions.moved.isEmpty, "\(sessions.moved.count) of 128 live flows changed slot: \(sessions.moved.prefix(8))")
        #expect(sessions.lost == 0, "no datagram lost")
        #expect(movedBuckets == 0, "the rebuilt plane has the running plane's bucket table")
        if workers == scaled {
            #expect(recordsAfter == recordsBefore, "the draining change's records carried over")
        } else {
            // The file's scale learns on top of the carried change: more records, none dropped.
            #expect(recordsAfter >= recordsBefore, "the draining change's records carried over")
        }
        #expect(try daemon.status()[0].listeners.count == 2)

        // The carried change ends once its flows are idle, with the file's workers.
        let ends = nowMs() + 15_000
        while try newMaps.readTransition().phase != RP_TRANSITION_NONE.rawValue, nowMs() < ends { sleepMs(50) }
        #expect(try newMaps.readTransition().phase == RP_TRANSITION_NONE.rawValue, "the change finished")
        let slots = try daemon.waitFor("\(workers) slots", timeoutMs: 15_000) { $0[0].slots.count == workers }[0].slots
        #expect(slots.map(\.slot) == (0..<UInt32(workers)).map { $0 })
    }

    /// The slot-indexed maps hold 4 slots per worker (16 for 4 workers). A `scale` beyond them is
    /// refused with the way out, and changes nothing. A reload to 8 workers, which the maps hold
    /// with room for an upgrade beside them, scales in place: every worker stays. A reload to 9
    /// (18 slots with an upgrade's) rebuilds the service with maps sized for it (64 slots),
    /// make-before-break: the rebuild keeps every live flow's slot, the file's count applies as a
    /// scale that keeps live flows too, and no datagram is lost.
    @Test func aReloadToMoreWorkersThanTheMapsHoldRebuildsThem() throws {
        func config(workers: Int) -> String {
            serviceTable("grow", listen: ["udp://127.0.0.1:0"], workers: workers, extra: """
                rcvbuf = 8388608
                flow_idle_timeout_ms = 1000
                """)
        }
        let daemon = try TestDaemon(config: config(workers: 4))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "grow")
        let layout = PinLayout(root: daemon.pinRoot, service: "grow")
        let maps = try DispatchMaps(pinned: layout)
        #expect(maps.slotCapacity == 16 && maps.flows.maxEntries == 4 * RP_TRACKED_FLOWS_PER_WORKER)
        let refused = try daemon.request(ControlRequest(command: .scale, service: "grow", workers: 17))
        #expect(!refused.ok && refused.error?.contains("hold 16 slots") == true
                    && refused.error?.contains("reload") == true, "\(refused)")
        #expect(try daemon.status()[0].slots.count == 4, "the refused scale changed nothing")

        let sessions = try Sessions(64) { "\($0.slot)" }
        try sessions.run(3, to: destination)
        let pids = try daemon.status()[0].slots.map(\.pid)
        try daemon.rewriteConfig(config(workers: 8))
        let inPlace = try daemon.request(ControlRequest(command: .reload))
        #expect(inPlace.ok && inPlace.message?.contains("rebuilt") == false, "\(inPlace)")
        let grown = try daemon.waitFor("8 slots", timeoutMs: 15_000) { $0[0].slots.count == 8 }[0].slots
        #expect(Array(grown.map(\.pid).prefix(4)) == pids, "the 4 workers stay through a scale in place")
        #expect(try DispatchMaps(pinned: layout).slotCapacity == 16, "the maps stay")
        try daemon.rewriteConfig(config(workers: 9))
        var response: ControlResponse?
        try sessions.run(10, to: destination) { _ in
            guard response == nil else { return }
            response = try daemon.request(ControlRequest(command: .reload))
        }
        #expect(response?.ok == true && response?.message?.contains("rebuilt grow") == true, "\(String(describing: response))")
        let rebuilt = try DispatchMaps(pinned: layout)
        #expect(rebuilt.slotCapacity == 64 && rebuilt.holdsSlots(forWorkers: 9) && !maps.holdsSlots(forWorkers: 9))
        #expect(sessions.moved.isEmpty, "\(sessions.moved.count) of 64 live flows changed slot")
        #expect(sessions.lost == 0, "no datagram lost")
        let slots = try daemon.waitFor("9 slots", timeoutMs: 15_000) { $0[0].slots.count == 9 }[0].slots
        #expect(slots.map(\.slot) == (0..<UInt32(9)).map { $0 })
    }

    /// v1 → v2 (an upgrade), then, while v1's live flows still drain on its slots, a reload that
    /// adds a listener rebuilds the service: every live flow keeps its slot, and the flows of the
    /// draining generation stay with a worker of v1's definition (the rebuilt plane keeps each
    /// slot's generation), until idle; new flows go to v2.
    @Test func aRebuildWhileAnOlderGenerationDrainsKeepsItsFlows() throws {
        func config(_ version: String, _ listen: [String]) -> String {
            serviceTable("rg", listen: listen, workers: 4, program: UpgradeWorker.program(version), extra: """
                rcvbuf = 8388608
                notify = true
                flow_idle_timeout_ms = 1000
                """)
        }
        let one = ["udp://127.0.0.1:0"]
        let daemon = try TestDaemon(config: config("v1", one))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "rg")
        let sessions = try Sessions(128) { "\($0.slot)/\($0.extra["version"] ?? "?")" }
        try sessions.run(3, to: destination)
        try daemon.rewriteConfig(config("v2", one))
        #expect(try daemon.request(ControlRequest(command: .reload)).ok)
        while try daemon.status()[0].upgrade?.phase != .switched {
            try sessions.run(1, to: destination)
            guard sessions.rounds < 60 else { throw HarnessError("v2 did not switch; log:\n\(daemon.logTail(20))") }
        }
        try sessions.run(2, to: destination)
        try daemon.rewriteConfig(config("v2", one + ["udp://[::1]:0"]))
        var response: ControlResponse?
        try sessions.run(10, to: destination) { _ in
            if response == nil { response = try daemon.request(ControlRequest(command: .reload)) }
        }
        let fresh = try Whoami.ask(try Traffic.clients(64, on: .loopbackV4), to: destination).compactMap { $0 }
        let status = try daemon.status()[0]
        let generations = Dictionary(grouping: status.slots, by: { $0.generation ?? 0 }).mapValues { $0.map(\.slot) }
        print("rebuild while generation 1 drains: \(response?.message ?? response?.error ?? "-"); \(sessions.moved.count) "
            + "of 128 live flows changed slot or version, \(sessions.lost) lost; slots by generation "
            + "\(generations.sorted { $0.key < $1.key }); new flows \(Set(fresh.map { $0.extra["version"] ?? "?" }).sorted())")
        #expect(response?.ok == true && response?.message?.contains("moved") == false, "\(String(describing: response))")
        #expect(sessions.moved.isEmpty, "live flows changed slot or version: \(sessions.moved.prefix(8))")
        #expect(sessions.lost == 0)
        #expect(Set(sessions.answers.flatMap { $0.map { $0.split(separator: "/")[1] } }) == ["v1"],
                "the live flows stay with v1")
        #expect(generations.count == 2, "the draining generation kept its slots: \(generations)")
        #expect(fresh.count == 64 && fresh.allSatisfy { $0.extra["version"] == "v2" }, "new flows go to v2")
        try daemon.waitFor("the old generation retired", timeoutMs: 15_000) { Set($0[0].slots.map(\.generation)).count == 1 }
    }
}
