#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The data plane outlives its daemon: workers keep serving when the daemon is killed, and a
/// daemon started on its pins adopts them (same pids, same sockets), proving each is the slot's
/// worker by its start time and its sockets by their cookies. Real daemon, whoami workers,
/// datagrams on loopback.
@Suite(.onTestThreads, .serialized) struct AdoptionTests {
    static func config(_ name: String, workers: Int = 4) -> String {
        serviceTable(name, workers: workers, extra: "rcvbuf = 8388608")
    }

    /// The first listener's socket cookie at each slot, from the pinned array.
    static func cookies(_ daemon: TestDaemon, _ service: String, slots: Int) throws -> [UInt64?] {
        let array = try SocketArray(pinned: PinLayout(root: daemon.pinRoot, service: service), listener: 0)
        return try (0..<UInt32(slots)).map { try array.cookie(at: $0) }
    }

    /// 256 flows send every 100 ms. The daemon is killed with SIGKILL: every datagram sent while
    /// no daemon runs is answered. A new daemon adopts every worker (same pids, no restart), and
    /// no flow changes worker. Then a worker killed with SIGKILL is replaced at the same slot on
    /// the same socket.
    @Test func aKilledDaemonsWorkersServeOnAndAreAdopted() throws {
        let first = try TestDaemon(config: Self.config("adopt"))
        let services = try first.waitForWorkers()
        let destination = try udpEndpoint(services, "adopt")
        let pids = services[0].slots.map(\.pid)
        let cookies = try Self.cookies(first, "adopt", slots: 4)
        let sessions = try Sessions(256, periodMs: 100)
        try sessions.run(5, to: destination)
        first.signal(SIGKILL)
        #expect(first.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
        // 1 s with no daemon, then a new one starts while the flows go on sending.
        var second: TestDaemon?
        try sessions.run(25, to: destination) { round in
            if round == 15 { second = try TestDaemon(config: Self.config("adopt"), pinRoot: first.pinRoot) }
        }
        let daemon = try #require(second)
        let adopted = try daemon.waitForWorkers()[0]
        try sessions.run(10, to: destination)
        print("daemon SIGKILLed under 256 flows × \(sessions.rounds) rounds: \(sessions.lost) datagrams lost, "
            + "\(sessions.moved.count) flows changed worker; adopted \(adopted.adoptedWorkers ?? -1) workers, "
            + "pids before \(pids), after \(adopted.slots.map(\.pid))")
        #expect(sessions.lost == 0, "every datagram was answered, with and without a daemon: \(sessions.report)")
        #expect(sessions.moved.isEmpty, "no flow changed worker (slot and pid)")
        #expect(adopted.slots.map(\.pid) == pids, "the same worker processes, slot by slot")
        #expect(adopted.adoptedWorkers == 4 && adopted.refusedAdoptions == 0)
        #expect(adopted.slots.allSatisfy { $0.state == "running" && $0.restarts == 0 }, "\(adopted.slots)")
        #expect(try Self.cookies(daemon, "adopt", slots: 4) == cookies, "every slot kept its socket")
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "adopt"))
        let rows = try (0..<UInt32(4)).map { try maps.readSlotState($0) }
        #expect(rows.map { Int32($0.pid) } == pids.compactMap { $0 }, "rp_slot_state names the adopted workers")
        #expect(rows.allSatisfy { $0.state == WorkerState.running.rawValue && $0.start_time != 0 })

        // An adopted worker is supervised through its pidfd: killed, it is replaced on its socket.
        let victim = try #require(pids[1])
        kill(victim, SIGKILL)
        let replaced = try daemon.waitFor("slot 1 has a new running worker") { services in
            services[0].slots[1].pid != victim && services[0].slots[1].state == "running"
        }[0]
        let before = sessions.answers
        try sessions.run(10, to: destination)
        let slotOne = before.indices.filter { before[$0].first?.hasPrefix("1/") == true }
        let changedSlot = sessions.answers.indices.filter { index in
            Set(sessions.answers[index].map { $0.split(separator: "/")[0] }).count != 1
        }
        print("adopted worker \(victim) SIGKILLed: replaced by \(replaced.slots[1].pid ?? 0); \(slotOne.count) flows "
            + "on slot 1, \(changedSlot.count) flows changed slot, \(sessions.lost) datagrams lost in all")
        #expect(changedSlot.isEmpty, "every flow kept its slot")
        #expect(slotOne.allSatisfy { sessions.answers[$0].contains("1/\(replaced.slots[1].pid ?? 0)") },
                "the replacement answers slot 1's flows")
        #expect(try Self.cookies(daemon, "adopt", slots: 4) == cookies, "on the same socket")
        #expect(sessions.lost <= 2, "at most what the killed worker held")
    }

    /// A slot's row names a pid that now belongs to an unrelated process (as after pid reuse:
    /// the worker died with the daemon down, and another process got its pid). The next daemon
    /// neither adopts nor signals it, gives the slot a new worker, and adopts the other slot's.
    @Test func aReusedPidIsNeitherAdoptedNorSignalled() throws {
        let first = try TestDaemon(config: Self.config("reuse", workers: 2))
        let pids = try first.waitForWorkers()[0].slots.map { $0.pid! }
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)
        kill(-pids[1], SIGKILL)
        let deadline = nowMs() + 5000
        while processExists(pids[1]) && nowMs() < deadline { sleepMs(10) }
        let stranger = try Subprocess("/bin/sleep", ["60"])
        let maps = try DispatchMaps(pinned: PinLayout(root: first.pinRoot, service: "reuse"))
        var row = try maps.readSlotState(1)
        row.pid = UInt32(stranger.pid)
        try maps.slotState.update(1, row)

        let second = try TestDaemon(config: Self.config("reuse", workers: 2), pinRoot: first.pinRoot)
        let service = try second.waitForWorkers()[0]
        sleepMs(300)
        print("slot 1's row named pid \(stranger.pid) (not its worker): slot pids now \(service.slots.map(\.pid)), "
            + "adopted \(service.adoptedWorkers ?? -1), refused \(service.refusedAdoptions ?? -1)")
        #expect(service.slots[0].pid == pids[0], "slot 0's worker was adopted")
        #expect(service.slots[1].pid != stranger.pid && service.slots[1].pid != pids[1], "slot 1 got a new worker")
        #expect(service.adoptedWorkers == 1 && service.refusedAdoptions == 1)
        #expect(stranger.wait(timeoutMs: 0) == nil, "the unrelated process was not signalled")
        #expect(try maps.readSlotState(1).pid == UInt32(service.slots[1].pid ?? 0))
    }

    /// `reexec` under 256 flows sending every 100 ms: the daemon execs itself in place; 0
    /// datagrams lost, the same daemon pid, the same worker pids (adopted by the new image).
    @Test func reexecKeepsThePidTheWorkersAndEveryDatagram() throws {
        let daemon = try TestDaemon(config: Self.config("inplace"))
        let services = try daemon.waitForWorkers()
        let destination = try udpEndpoint(services, "inplace")
        let pids = services[0].slots.map(\.pid)
        let before = try daemon.request(ControlRequest(command: .status)).daemon
        let sessions = try Sessions(256, periodMs: 100)
        let status = try reexec(daemon, under: sessions, rounds: 30, at: 10, to: destination)
        let after = try daemon.request(ControlRequest(command: .status)).daemon
        print("reexec under 256 flows × \(sessions.rounds) rounds: \(sessions.lost) lost, \(sessions.moved.count) "
            + "changed worker; daemon \(String(describing: before)) → \(String(describing: after)); "
            + "adopted \(status.adoptedWorkers ?? -1), pids \(pids) → \(status.slots.map(\.pid))")
        #expect(daemon.checkExited() == nil, "the daemon process lives on")
        #expect(after?.pid == before?.pid && after?.startedAtNs != before?.startedAtNs, "same pid, new image")
        #expect(status.slots.map(\.pid) == pids && status.adoptedWorkers == 4, "the same workers, adopted")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
        // The new image supervises them: a worker that dies is replaced.
        let victim = try #require(pids[2])
        kill(victim, SIGKILL)
        try daemon.waitFor("slot 2 has a new running worker") { services in
            services[0].slots[2].pid != victim && services[0].slots[2].state == "running"
        }
    }

    /// A reexec into a binary that exits at once: the daemon process is gone, the workers serve
    /// on, and the next daemon started on the pins adopts them all.
    @Test func reexecIntoABrokenBinaryLeavesTheWorkersServing() throws {
        let folder = try TemporaryDirectory("reuseportd-reexec")
        let binary = "\(folder.path)/reuseportd"
        try FileManager.default.copyItem(atPath: TestDaemon.builtBinary, toPath: binary)
        let daemon = try TestDaemon(config: Self.config("broken"), binary: binary)
        let services = try daemon.waitForWorkers()
        let destination = try udpEndpoint(services, "broken")
        let pids = services[0].slots.map(\.pid)
        // Replaced as a package upgrade does: a new file renamed over the old path.
        let broken = try folder.write("new", "#!/bin/sh\nexit 3\n")
        chmod(broken, 0o755)
        #expect(rename(broken, binary) == 0)
        let sessions = try Sessions(256, periodMs: 100)
        try sessions.run(20, to: destination) { round in
            if round == 5 { _ = try daemon.request(ControlRequest(command: .reexec)) }
        }
        #expect(daemon.waitForExit(timeoutMs: 5000) == 3, "the new image exited with its status; log: \(daemon.keepLog())")
        #expect(pids.compactMap { $0 }.allSatisfy(processExists), "every worker lives on")
        let next = try TestDaemon(config: Self.config("broken"), pinRoot: daemon.pinRoot)
        let adopted = try next.waitForWorkers()[0]
        try sessions.run(5, to: destination)
        print("reexec into a binary that exits: \(sessions.lost) of \(256 * sessions.rounds) datagrams lost; "
            + "the next daemon adopted \(adopted.adoptedWorkers ?? -1), pids \(pids) → \(adopted.slots.map(\.pid))")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
        #expect(adopted.slots.map(\.pid) == pids && adopted.adoptedWorkers == 4,
                "adopted \(adopted.slots.map(\.pid)) of \(pids); daemon log: \(next.keepLog())")
    }

    /// A removed slot's worker still draining its queue when the daemon is killed: the next
    /// daemon takes it over as draining (it is not stopped at once), holds a copy of its socket
    /// (copied out of it), lets it answer every datagram queued at its slot, and stops it only
    /// then; the copy is released once the worker is gone (it leaves the port, then closes).
    @Test func aDrainInterruptedByADaemonKillGoesOn() throws {
        let config = "stop_timeout_ms = 20000\n"
            + serviceTable("drainkill", workers: 4, extra: "rcvbuf = 8388608\nflow_tracking = false")
        let first = try TestDaemon(config: config)
        let services = try first.waitForWorkers()
        let destination = try udpEndpoint(services, "drainkill")
        let leaving = try #require(services[0].slots.first { $0.slot == 3 }?.pid)
        let cookie = try #require(try Self.cookies(first, "drainkill", slots: 4)[3])
        // Slot 3's worker reads nothing while stopped: its flows' datagrams wait in its queue.
        kill(leaving, SIGSTOP)
        defer { kill(leaving, SIGCONT) }
        let numbered = NumberedFlows(try Traffic.clients(128, on: .loopbackV4))
        try numbered.send(0, to: destination)
        try numbered.receive(until: nowMs() + 1000)
        let waiting = numbered.answered.filter(\.isEmpty).count
        #expect(waiting > 0, "some flows are slot 3's")
        let scaled = try first.request(ControlRequest(command: .scale, service: "drainkill", workers: 3))
        #expect(scaled.ok, "\(scaled.error ?? "")")
        _ = try first.waitFor("slot 3's worker draining") { services in
            services[0].leaving?.contains { $0.pid == leaving && $0.state == .draining } == true
        }
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)
        let second = try TestDaemon(config: config, pinRoot: first.pinRoot)
        let adopted = try second.waitFor("the leaving worker taken over") { services in
            services.first?.leaving?.contains { $0.pid == leaving } == true
        }
        let state = adopted[0].leaving?.first { $0.pid == leaving }?.state
        kill(leaving, SIGCONT)
        try numbered.receive(until: nowMs() + 10_000, orAll: 1)
        let unanswered = numbered.unanswered(rounds: 1)
        _ = try second.waitFor("the leaving worker stopped once drained") { _ in !processExists(leaving) }
        let socketGone = (0..<100).contains { _ in
            if (try? SocketDiagnostics.sockets([.udp]))?[cookie] == nil { return true }
            usleep(20_000)
            return false
        }
        print("a drain interrupted by a daemon kill: \(waiting) of 128 datagrams waited at slot 3; the next daemon "
            + "took its worker over as \(state.map(\.rawValue) ?? "-"); \(unanswered.count) unanswered; its socket "
            + (socketGone ? "closed" : "still open"))
        #expect(state == .draining, "taken over as \(String(describing: state)): \(second.logTail(8))")
        #expect(unanswered.isEmpty, "\(unanswered.prefix(5))")
        #expect(socketGone, "slot 3's socket outlived its worker: the daemon did not release its copy")
        #expect(second.log.contains("it drains on what was queued at its slot"), "\(second.logTail(8))")
    }

    /// A daemon killed, then started on its pins with more workers than its maps hold with room
    /// for an upgrade (9 in the 16 slots of 4): it takes the workers over, then builds the service
    /// again beside them with maps sized for 9 (64 slots), as a reload would, and scales to 9.
    /// Every live flow keeps its slot and no datagram is lost.
    @Test func aStartWithMoreWorkersThanThePinnedMapsHoldRebuildsThem() throws {
        func config(_ workers: Int) -> String {
            serviceTable("outgrow", workers: workers, extra: "rcvbuf = 8388608\nflow_idle_timeout_ms = 1000")
        }
        let first = try TestDaemon(config: config(4))
        let destination = try udpEndpoint(try first.waitForWorkers(), "outgrow")
        let layout = PinLayout(root: first.pinRoot, service: "outgrow")
        #expect(try DispatchMaps(pinned: layout).slotCapacity == 16)
        let sessions = try Sessions(64) { "\($0.slot)" }
        try sessions.run(3, to: destination)
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)
        var second: TestDaemon?
        try sessions.run(10, to: destination) { round in
            if round == 5 { second = try TestDaemon(config: config(9), pinRoot: first.pinRoot) }
        }
        let next = try #require(second)
        let slots = try next.waitFor("9 slots", timeoutMs: 20_000) { $0[0].slots.count == 9 }[0].slots
        try sessions.run(5, to: destination)
        let capacity = try DispatchMaps(pinned: layout).slotCapacity
        print("a start with 9 workers on the pins of 4: maps of \(capacity) slots, slots \(slots.map(\.slot)); "
            + "\(sessions.lost) lost, \(sessions.moved.count) of 64 live flows changed slot")
        #expect(capacity == 64, "\(next.logTail(8))")
        #expect(next.log.contains("building the service again beside them"), "\(next.logTail(8))")
        #expect(slots.map(\.slot) == (0..<UInt32(9)).map { $0 })
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
    }

    /// Workers that run as another user (nobody) are adopted too: copying their sockets out
    /// (pidfd_getfd) takes CAP_SYS_PTRACE, which the daemon keeps (and `make
    /// test-least-privilege` runs this with only the documented capabilities).
    @Test func workersOfAnotherUserAreAdopted() throws {
        let config = serviceTable("nobody", workers: 2, extra: "user = \"nobody\"")
        let first = try TestDaemon(config: config)
        let services = try first.waitForWorkers()
        let pids = services[0].slots.map(\.pid)
        first.signal(SIGKILL)
        _ = first.waitForExit(timeoutMs: 5000)
        let second = try TestDaemon(config: config, pinRoot: first.pinRoot)
        let adopted = try second.waitForWorkers()[0]
        print("workers of user nobody: pids \(pids) → \(adopted.slots.map(\.pid)), adopted \(adopted.adoptedWorkers ?? -1)")
        #expect(adopted.slots.map(\.pid) == pids && adopted.adoptedWorkers == 2, "\(second.logTail(8))")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let reply = try Whoami.ask([client], to: udpEndpoint(services, "nobody")).first!
        #expect(reply.map { pids.contains(Int32($0.pid)) } == true, "an adopted worker answers")
    }

    /// A slot whose worker is down at the exec (here every slot: the program exits at once and
    /// the slots back off) has no worker to give its socket back: the old image hands every
    /// slot's sockets over itself, and the new image keeps them at their slots (same cookies).
    @Test func reexecKeepsTheSocketsOfSlotsWithoutAWorker() throws {
        let daemon = try TestDaemon(config: serviceTable("down", workers: 3, program: "exec = [\"/bin/false\"]"))
        try daemon.waitFor("the pinned sockets") { _ in
            ((try? Self.cookies(daemon, "down", slots: 3)) ?? []).allSatisfy { $0 != nil }
        }
        let cookies = try Self.cookies(daemon, "down", slots: 3)
        let identity = try daemon.request(ControlRequest(command: .status)).daemon
        let answer = try daemon.request(ControlRequest(command: .reexec))
        #expect(answer.ok, "\(answer)")
        try daemon.waitFor("the new image") { _ in
            (try? daemon.request(ControlRequest(command: .status)).daemon?.startedAtNs) != identity?.startedAtNs
        }
        let after = try Self.cookies(daemon, "down", slots: 3)
        print("reexec with every worker down: cookies \(cookies) → \(after)")
        #expect(after == cookies, "every slot kept its socket across the exec")
        // A /bin/false worker may be alive at the exec, and adopted: the others were handed over.
        let adopted = try daemon.status()[0].adoptedWorkers ?? 0
        #expect(adopted < 3, "at least one slot had no worker to give its socket back (\(adopted) adopted)")
    }
}
