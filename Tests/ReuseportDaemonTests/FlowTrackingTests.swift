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

/// Placement changes that keep live flows on their worker: the real daemon, real whoami
/// workers, real datagrams; the records and counters read back from the pinned maps.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct FlowTrackingTests {
    /// A 1 s idle timeout: the change learns for 1 s; flows send every 200 ms.
    static let idleMs = 1000

    static func config(_ name: String, workers: Int, extra: String = "") -> String {
        serviceTable(name, workers: workers, extra: """
            rcvbuf = 8388608
            flow_idle_timeout_ms = \(idleMs)
            \(extra)
            """)
    }

    static func maps(_ daemon: TestDaemon, _ service: String) throws -> DispatchMaps {
        try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: service))
    }

    /// 512 flows each send every 200 ms through a scale 4 → 6 and for over twice the idle
    /// timeout after: none changes worker (same slot, same pid) and none loses a datagram. Then
    /// 512 new flows spread over all 6 slots.
    @Test func scaleUpMovesNoLiveFlow() throws {
        let daemon = try TestDaemon(config: Self.config("grow", workers: 4))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "grow")
        let sessions = try Sessions(512)
        let maps = try Self.maps(daemon, "grow")
        var learning: rp_transition?
        try sessions.run(5, to: destination)
        try sessions.run(20, to: destination) { round in
            if round == 5 {
                let response = try daemon.request(ControlRequest(command: .scale, service: "grow", workers: 6))
                #expect(response.ok, "\(response)")
                print("scale 4 → 6: \(response.message ?? "")")
                learning = try maps.readTransition()
            }
        }
        let after = try maps.readTransition()
        let counters = try maps.flowCounters()
        print("512 flows × \(sessions.rounds) rounds through scale 4 → 6: \(sessions.moved.count) changed worker, "
            + "\(sessions.lost) datagrams lost; records made \(counters.recorded), pinned packets \(counters.pinned), "
            + "untracked \(counters.untracked)")
        #expect(learning?.phase == RP_TRANSITION_LEARNING.rawValue, "the change learned first")
        #expect(after.phase == RP_TRANSITION_DRAINING.rawValue, "then switched, and drains while the flows send")
        #expect(sessions.moved.isEmpty, "no live flow changed worker: \(sessions.moved.prefix(5))")
        #expect(sessions.lost == 0, "no datagram lost: \(sessions.report)")
        #expect(counters.recorded > 100 && counters.untracked == 0, "the flows of the moving third were recorded")
        #expect(counters.pinned > 0, "recorded flows were steered by their records")
        #expect(Set(sessions.slots).isSubset(of: [0, 1, 2, 3]), "live flows stayed on the old slots")

        let fresh = try Traffic.clients(512, on: .loopbackV4)
        let replies = try Whoami.ask(fresh, to: destination)
        var perSlot: [UInt32: Int] = [:]
        for reply in replies.compactMap({ $0 }) { perSlot[reply.slot, default: 0] += 1 }
        print("512 new flows after the switch: \(perSlot.sorted { $0.key < $1.key })")
        #expect(perSlot.keys.sorted() == [0, 1, 2, 3, 4, 5])
        for slot in [4, 5] as [UInt32] {
            #expect((50...130).contains(perSlot[slot] ?? 0), "slot \(slot) takes about 1/6 of new flows")
        }
    }

    /// 512 flows each send every 200 ms through a scale 6 → 3: the flows of slots 3–5 keep their
    /// worker while they send and no datagram is lost; once they stop, those workers are stopped
    /// and their slots leave.
    @Test func scaleDownDrainsLeavingSlots() throws {
        let daemon = try TestDaemon(config: Self.config("shrink", workers: 6))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "shrink")
        let before = try daemon.status()[0].slots
        let leavingPids = before.filter { $0.slot >= 3 }.compactMap(\.pid)
        let sessions = try Sessions(512)
        try sessions.run(5, to: destination)
        var stillServing = true
        try sessions.run(20, to: destination) { round in
            if round == 5 {
                let response = try daemon.request(ControlRequest(command: .scale, service: "shrink", workers: 3))
                #expect(response.ok, "\(response)")
                print("scale 6 → 3: \(response.message ?? "")")
            }
            if round > 5 { stillServing = stillServing && leavingPids.allSatisfy(processExists) }
        }
        let onLeaving = sessions.slots.filter { $0 >= 3 }.count
        print("512 flows × \(sessions.rounds) rounds through scale 6 → 3: \(onLeaving) on slots 3–5, "
            + "\(sessions.moved.count) changed worker, \(sessions.lost) lost")
        #expect(onLeaving > 150, "about half the flows were on the leaving slots")
        #expect(sessions.moved.isEmpty, "no live flow changed worker: \(sessions.moved.prefix(5))")
        #expect(sessions.lost == 0, "no datagram lost: \(sessions.report)")
        #expect(stillServing, "the leaving slots' workers served while their flows sent")

        // The flows stop: after the idle timeout the leaving slots retire.
        let retired = try daemon.waitFor("slots 3–5 retired", timeoutMs: 15_000) { services in
            services[0].slots.map(\.slot) == [0, 1, 2]
        }
        let gone = nowMs() + 5000
        while leavingPids.contains(where: processExists), nowMs() < gone { sleepMs(20) }
        #expect(!leavingPids.contains(where: processExists), "the leaving slots' workers were stopped")
        let maps = try Self.maps(daemon, "shrink")
        let sockets = try SocketArray(pinned: PinLayout(root: daemon.pinRoot, service: "shrink"), listener: 0)
        #expect(try sockets.liveSlots(below: 8) == [0, 1, 2], "the leaving slots' sockets left the array")
        #expect(retired[0].removedSlotDrops == 0)
        _ = try daemon.waitFor("the change finished", timeoutMs: 10_000) { _ in
            (try? maps.readTransition().phase) == RP_TRANSITION_NONE.rawValue
        }
        #expect(try FlowRecords.read(maps).isEmpty, "no record is left once the change is over")
        #expect(try maps.readBucketValues().allSatisfy { $0 & UInt32(RP_BUCKET_FLAGS) == 0 }, "no bucket flag left")
    }

    /// 1,000 flows meet a change with room for 256 records: exactly the overflow is counted as
    /// untracked (once per flow), and every recorded flow keeps its worker. No rate bound: the
    /// default spreads the 256 records over the whole window, and the table must fill at once.
    @Test func overflowIsCountedExactlyAndRecordedFlowsStay() throws {
        let daemon = try TestDaemon(config: Self.config("full", workers: 4,
                                                        extra: "max_tracked_flows = 256\nmax_new_flows_per_second = 0"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "full")
        let sessions = try Sessions(1000)
        let maps = try Self.maps(daemon, "full")
        var moving = 0
        try sessions.run(3, to: destination)
        try sessions.run(15, to: destination) { round in
            guard round == 3 else { return }
            let response = try daemon.request(ControlRequest(command: .scale, service: "full", workers: 8))
            #expect(response.ok, "\(response)")
            // Which flows' buckets move at the switch, from the tables the program reads.
            let config = try maps.readConfig()
            let current = try maps.readBuckets()
            let next = try maps.readNextBuckets(count: current.count)
            moving = sessions.numbered.clients.filter { client in
                let flow = FlowTuple(.udp, from: client.local, to: destination)
                let bucket = Int(FlowHash.bucket(hash: FlowHash.hash(flow, seed: config.seed), count: UInt32(current.count)))
                return next[bucket] != current[bucket]
            }.count
        }
        let counters = try maps.flowCounters()
        let records = try FlowRecords.read(maps)
        let recorded = Set(records.map(\.flow.source))
        let movedRecorded = sessions.moved.filter { recorded.contains(sessions.numbered.clients[$0].local) }
        print("1000 flows, \(moving) in moving buckets, room for 256: recorded \(counters.recorded), "
            + "untracked \(counters.untracked), uncounted \(counters.untracked_uncounted); "
            + "\(sessions.moved.count) flows changed worker, \(movedRecorded.count) of them recorded")
        #expect(moving > 300, "the change meets more flows than it can record")
        #expect(counters.recorded == 256)
        #expect(counters.untracked == UInt64(moving - 256), "exactly the overflow is counted")
        #expect(counters.untracked_uncounted == 0)
        #expect(movedRecorded.isEmpty, "every recorded flow keeps its worker")
        #expect(sessions.moved.count <= moving - 256, "only untracked flows may move")
        #expect(sessions.lost == 0, "\(sessions.report)")
    }

    /// A slot down past failover_after_ms lends its buckets; when it is back, the flows the
    /// others took over stay there, and new flows go to the restored slot.
    @Test func restoreAfterFailoverKeepsTakenOverFlows() throws {
        let directory = try TemporaryDirectory()
        let marker = "\(directory.path)/healthy"
        let script = """
            [ "$REUSEPORT_SLOT" = 1 ] && [ ! -e \(marker) ] && exit 3
            exec \(TestDaemon.builtBinary) worker whoami
            """
        let daemon = try TestDaemon(config: """
            [[service]]
            name = "back"
            listen = ["udp://127.0.0.1:0"]
            workers = 4
            exec = ["/bin/sh", "-c", '''\(script)''']
            rcvbuf = 8388608
            restart_backoff_min_ms = 200
            restart_backoff_max_ms = 200
            ready_after_ms = 200
            failover_after_ms = 300
            flow_idle_timeout_ms = \(Self.idleMs)
            """)
        let services = try daemon.waitFor("slot 1 failed over") { $0[0].slots.first { $0.slot == 1 }?.state == "failed-over" }
        let destination = try udpEndpoint(services, "back")
        let sessions = try Sessions(256)
        try sessions.run(5, to: destination)
        #expect(!sessions.slots.contains(1), "while slot 1 is down its flows are served by the others")
        try sessions.run(20, to: destination) { round in
            if round == 5 { _ = FileManager.default.createFile(atPath: marker, contents: nil) }
        }
        let maps = try Self.maps(daemon, "back")
        let counters = try maps.flowCounters()
        print("256 flows through failover then restore: \(sessions.moved.count) changed worker, \(sessions.lost) lost; "
            + "recorded \(counters.recorded), pinned \(counters.pinned)")
        #expect(try daemon.status()[0].slots.first { $0.slot == 1 }?.state == "running")
        #expect(sessions.moved.isEmpty, "the flows taken over stay where they are: \(sessions.moved.prefix(5))")
        #expect(sessions.lost == 0, "\(sessions.report)")
        #expect(counters.recorded > 0)

        _ = try daemon.waitFor("the restore switched", timeoutMs: 10_000) { _ in
            (try? maps.readBuckets().contains(1)) == true
        }
        let fresh = try Traffic.clients(256, on: .loopbackV4)
        let replies = try Whoami.ask(fresh, to: destination).compactMap { $0 }
        let onRestored = replies.filter { $0.slot == 1 }.count
        print("256 new flows after the restore: \(onRestored) on slot 1")
        #expect((30...100).contains(onRestored), "new flows go to the restored slot again (about a quarter)")
    }

    /// The daemon is killed with SIGKILL in the middle of a scale 4 → 6 (learning, or draining
    /// after the switch) and started again on the same pins with the same file (which still says
    /// 4 workers): it adopts the 6 workers, resumes the change from the pinned maps, every
    /// recorded flow is served by its worker again, the change completes at 6 slots, and new
    /// flows reach the new slots.
    @Test(arguments: ["learning", "draining"])
    func aDaemonKilledMidChangeFinishesIt(_ phase: String) throws {
        let port = try freePort()
        let config = serviceTable("resume", listen: ["udp://127.0.0.1:\(port)"], workers: 4, extra: """
            rcvbuf = 8388608
            flow_idle_timeout_ms = 2000
            """)
        let first = try TestDaemon(config: config)
        let destination = try udpEndpoint(try first.waitForWorkers(), "resume")
        let sessions = try Sessions(256)
        let maps = try Self.maps(first, "resume")
        try sessions.run(3, to: destination)
        let before = sessions.slots
        let response = try first.request(ControlRequest(command: .scale, service: "resume", workers: 6))
        #expect(response.ok, "\(response)")
        // Learning lasts 2 s: kill at 1 s (learning) or at 3 s (switched, draining).
        try sessions.run(phase == "learning" ? 5 : 15, to: destination)
        let records = try FlowRecords.read(maps)
        let killedIn = try maps.readTransition().phase
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)

        let second = try TestDaemon(config: config, pinRoot: first.pinRoot)
        let adopted = try second.waitFor("6 slots with a running worker") { services in
            services[0].slots.filter { $0.state == "running" }.count == 6
        }[0]
        #expect(adopted.adoptedWorkers == 6, "the killed daemon's 6 workers were adopted")
        // Every flow still reaches the slot it had before the scale, and the same worker.
        var landed: [UInt32] = []
        var newWorker: [Int] = []
        for (index, client) in sessions.numbered.clients.enumerated() {
            let reply = try #require(try Whoami.ask([client], to: destination, attempts: 5).first!)
            landed.append(reply.slot)
            if !sessions.answers[index].contains("\(reply.slot)/\(reply.pid)") { newWorker.append(index) }
        }
        let moved = landed.indices.filter { landed[$0] != before[$0] }
        let recordedSources = Set(records.map(\.flow.source))
        let movedRecorded = moved.filter { recordedSources.contains(sessions.numbered.clients[$0].local) }
        print("killed while \(phase) (phase \(killedIn)) with \(records.count) records; after the restart "
            + "\(moved.count) of \(landed.count) flows on another slot, \(movedRecorded.count) of them recorded")
        #expect(records.count > 30, "the moving buckets' flows were recorded before the kill")
        #expect(movedRecorded.isEmpty, "no recorded flow moved")
        if phase == "draining" { #expect(moved.isEmpty, "every live flow was recorded and stays") }
        #expect(newWorker.isEmpty, "\(newWorker.count) flows answered by a worker they had not met before the kill")
        let resumed = try Self.maps(second, "resume")
        _ = try second.waitFor("the change switched", timeoutMs: 10_000) { _ in
            (try? resumed.readTransition().phase) != RP_TRANSITION_LEARNING.rawValue
        }
        let fresh = try Whoami.ask(try Traffic.clients(256, on: .loopbackV4), to: destination).compactMap { $0 }
        let onNew = fresh.filter { $0.slot >= 4 }.count
        print("256 new flows after the resumed switch: \(onNew) on slots 4–5")
        #expect((50...130).contains(onNew), "the resumed change gave the new slots a third of new flows")
    }

    /// A TCP service scaled 4 → 2 → 4 → 2 while 8 clients keep opening connections (connect,
    /// ask, read the answer, close): none is refused or reset. A leaving listener leaves the
    /// array at once (no new SYN reaches it) and closes only once its accept queue stayed empty;
    /// on 5.14+ the kernel moves what a closing listener still holds to a live slot.
    @Test func tcpScaleDownRefusesNoConnection() throws {
        let daemon = try TestDaemon(config: serviceTable("stream", listen: ["tcp://127.0.0.1:0"], workers: 4))
        let services = try daemon.waitForWorkers()
        let destination = try Endpoint(parsing: try #require(services[0].listeners.first)).address
        let stop = Atomic<Bool>(false)
        let done = Atomic<Int>(0)
        let failed = Atomic<Int>(0)
        let failures = Mutex<[String]>([])
        let slow = Atomic<Int>(0)
        let group = DispatchGroup()
        for _ in 0..<8 {
            DispatchQueue.global().async(group: group) {
                while !stop.load(ordering: .relaxed) {
                    let started = nowMs()
                    defer { if nowMs() - started > 500 { slow.add(1, ordering: .relaxed) } }
                    do {
                        let client = try FlowClient(.tcp, local: SocketAddress(.loopbackV4, 0))
                        try client.connect(to: destination)
                        try client.send(Array("hello\n".utf8), to: destination)
                        guard let reply = try client.receive(timeoutMs: 3000), WhoamiReply(reply) != nil else {
                            throw HarnessError("no answer on an accepted connection")
                        }
                        done.add(1, ordering: .relaxed)
                        // Paced: every closed connection holds its port in TIME_WAIT for 60 s, and
                        // tens of thousands would exhaust the ephemeral ports the next tests use.
                        usleep(4000)
                    } catch {
                        failed.add(1, ordering: .relaxed)
                        failures.withLock { $0.append("\(error)") }
                    }
                }
            }
        }
        for workers in [2, 4, 2] {
            sleepMs(700)
            let response = try daemon.request(ControlRequest(command: .scale, service: "stream", workers: workers))
            #expect(response.ok, "\(response)")
        }
        _ = try daemon.waitFor("2 slots left") { $0[0].slots.map(\.slot) == [0, 1] }
        sleepMs(700)
        stop.store(true, ordering: .relaxed)
        group.wait()
        let maps = try Self.maps(daemon, "stream")
        let global = try maps.globalCounters()
        print("TCP 4 → 2 → 4 → 2 under 8 connecting clients: \(done.load(ordering: .relaxed)) connections served, "
            + "\(failed.load(ordering: .relaxed)) failed (\(failures.withLock { Array($0.prefix(2)) })), "
            + "\(slow.load(ordering: .relaxed)) took over 500 ms; migrated \(global.migrated), migrate_failed \(global.migrate_failed) "
            + "(migration \(ReuseportMigration.isSupported ? "supported" : "not supported"))")
        #expect(done.load(ordering: .relaxed) > 200, "connections kept coming")
        #expect(failed.load(ordering: .relaxed) == 0, "none refused or reset: \(failures.withLock { Array($0.prefix(3)) })")
        #expect(global.migrate_failed == 0)
    }
}
