#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The daemon keeps serving whatever its workers and operators do: something outside killing
/// workers, scale-downs right after scale-ups. Real daemon binary, real signals and flows.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct DisruptionTests {
    /// A slot that has a worker: starting, running, or failed over with a trial worker.
    static func isLit(_ slot: SlotStatus) -> Bool {
        slot.pid != nil && (slot.state == "running" || slot.state == "starting" || slot.state == "failed-over")
    }

    /// With the default restart settings, SIGKILLs from outside at about 10 per second, each to
    /// a worker that has one, for 4 s. Killed workers that were serving are not quick exits,
    /// back-offs are jittered, and the last slot standing is restarted at once: the status,
    /// sampled every 25 ms, never shows every slot dark at once. Alone: the restarts must keep
    /// up with the kills, which a CPU shared with other daemons' tests does not promise.
    @Test(.alone) func aKillStormNeverDarkensEverySlot() throws {
        let daemon = try TestDaemon(config: serviceTable("storm", workers: 8))
        try daemon.waitForWorkers()
        var samples = 0, allDark = 0, kills = 0
        var fewestLit = Int.max
        var random = SystemRandomNumberGenerator()
        let end = nowMs() + 4000
        var nextKill = nowMs()
        while nowMs() < end {
            let slots = try daemon.status()[0].slots
            samples += 1
            let lit = slots.filter(DisruptionTests.isLit)
            fewestLit = min(fewestLit, lit.count)
            if lit.isEmpty { allDark += 1 }
            if nowMs() >= nextKill, let victim = slots.compactMap(\.pid).randomElement(using: &random) {
                kill(victim, SIGKILL)
                kills += 1
                nextKill += 100
            }
            sleepMs(25)
        }
        let after = try daemon.status()[0]
        print("kill storm: \(kills) SIGKILLs in 4 s over 8 slots; \(samples) status samples, \(allDark) with every "
            + "slot dark, fewest lit \(fewestLit); rescue starts \(after.rescueStarts ?? -1); restarts "
            + after.slots.map { "\($0.restarts)" }.joined(separator: " "))
        #expect(kills >= 30, "the storm ran")
        #expect(allDark == 0, "never every slot dark at once: \(allDark) of \(samples) samples")
        try daemon.waitForWorkers(timeoutMs: 30_000)
    }

    /// 256 flows send a numbered datagram every 20 ms to 4 whoami workers. Three times, the
    /// service is scaled to 8 and, two rounds later, back to 4: the new slots' workers have
    /// just been started and may not have read anything yet. What was queued at a removed
    /// slot is still read by its worker (it is stopped only once its socket's queue is empty):
    /// every datagram is answered, and the status counts no drop at a removed slot. Alone: "no
    /// loss" holds below saturation, and other tests' daemons beside it can saturate the workers.
    @Test(.alone) func scalingDownRightAfterScalingUpLosesNoDatagram() throws {
        let daemon = try TestDaemon(config: serviceTable("shrink", workers: 4,
                                                         extra: "rcvbuf = 8388608\nflow_tracking = false"))
        let destination = try udpEndpoint(try daemon.waitForWorkers(), "shrink")
        let clients = try Traffic.clients(256, on: .loopbackV4)
        let flows = clients.count
        let roundMs = 20.0
        let scaleRounds: [Int: Int] = [20: 8, 22: 4, 60: 8, 62: 4, 100: 8, 102: 4]
        let rounds = 130
        var slotsSeen = Set<UInt32>()
        let numbered = NumberedFlows(clients)

        let start = nowMs()
        for round in 0..<rounds {
            try numbered.send(round, to: destination)
            if let workers = scaleRounds[round] {
                let response = try daemon.request(ControlRequest(command: .scale, service: "shrink", workers: workers))
                #expect(response.ok, "scale to \(workers): \(response.error ?? "")")
            }
            try numbered.receive(until: start + Double(round + 1) * roundMs) { _, _, reply in
                slotsSeen.insert(reply.slot)
            }
        }
        try numbered.receive(until: nowMs() + 10_000, orAll: rounds)

        let answered = numbered.answered
        let lost = answered.reduce(0) { $0 + rounds - $1.count }
        let missing = numbered.unanswered(rounds: rounds)
        let drops = kernelUDPDrops(ports: Set(clients.map(\.local.port) + [destination.port]))
        let status = try daemon.status()[0]
        let global = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "shrink")).globalCounters()
        print("scale 4 → 8 → 4 three times under \(flows) flows × \(rounds) datagrams: \(lost) unanswered, "
            + "\(drops) dropped by the kernel, \(status.removedSlotDrops ?? -1) dropped at removed slots, "
            + "\(global.dropped_no_slot) by the program for want of a slot, \(global.fallbacks) fallbacks; "
            + "slots seen \(slotsSeen.sorted())")
        #expect(slotsSeen.contains { $0 >= 4 }, "the added slots got traffic")
        #expect(drops == 0, "no socket overflowed")
        #expect(global.dropped_no_slot == 0, "the program always had a slot")
        #expect(lost == 0, "every datagram is answered: \(lost) of \(flows * rounds) were not: \(missing.prefix(10)); daemon log: \(daemon.keepLog())")
        #expect(status.removedSlotDrops == 0, "no datagram was dropped at a removed slot")
        #expect(status.slots.count == 4 && status.slots.allSatisfy { $0.pid != nil })
    }
}
