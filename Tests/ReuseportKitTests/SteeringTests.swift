#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportTestSupport
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// The steering program on the running kernel: real sockets, real packets, counters read
/// back from the maps. Needs root (loading BPF); every test here says so when it skips.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
struct SteeringTests {
    static let families: [IPAddress] = [.loopbackV4, .loopbackV6]

    func service(_ transport: Transport, on address: IPAddress, slots: Int, seed: UInt32 = 0x5eed)
        throws -> ServiceDataPlane
    {
        try ServiceDataPlane(endpoints: [Endpoint(transport, SocketAddress(address, 0))], slotCount: slots,
                             options: .init(seed: seed))
    }

    func sockets(_ plane: ServiceDataPlane) -> [UInt32: ReuseportSocket] {
        plane.listeners[0].sockets
    }

    /// 512 flows from distinct source ports each land on the slot the Swift side predicts.
    /// 16 slots too: above 10 sockets the kernel's UDP lookup takes another path (hslot2).
    @Test(arguments: [4, 16], families)
    func udpFlowsLandOnThePredictedSlot(slots: Int, address: IPAddress) throws {
        let plane = try service(.udp, on: address, slots: slots)
        let destination = plane.listeners[0].endpoint.address
        let outcome = try SteeringScenario.exactSlot(plane, .udp, clients: address, to: destination, flows: 512)
        for landing in outcome.landings {
            #expect(landing.slot != nil && landing.slot == landing.predicted, "\(landing.client)")
        }
        #expect(outcome.slotsUsed == slots, "every slot receives some of 512 flows")
        #expect(outcome.counted == 512, "the program counted every datagram: the BPF path ran")
    }

    /// TCP: the listener at the predicted slot accepts each connection.
    @Test(arguments: [4, 16], families)
    func tcpConnectionsAreAcceptedByThePredictedListener(slots: Int, address: IPAddress) throws {
        let plane = try service(.tcp, on: address, slots: slots)
        let destination = plane.listeners[0].endpoint.address
        let outcome = try SteeringScenario.exactSlot(plane, .tcp, clients: address, to: destination, flows: 512)
        for landing in outcome.landings {
            #expect(landing.peer == landing.client)
            #expect(landing.slot == landing.predicted)
        }
        #expect(outcome.counted == 512)
    }

    /// Closing the socket at one slot and putting a new one there moves no flow.
    @Test func replacingASocketAtItsSlotMovesNoFlow() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 4)
        let outcome = try SteeringScenario.replaceAtSlot(plane, slot: 1, flows: 512)
        #expect(outcome.before == outcome.after)
        #expect(Set(outcome.before.values).count == 4)
    }

    /// Why the product exists: the same scenario without the program moves flows. The
    /// kernel moves its last socket into the hole (net/core/sock_reuseport.c,
    /// __reuseport_detach_sock()) and hashes on socket positions.
    @Test func withoutTheProgramReplacingASocketMovesFlows() throws {
        let moved = try SteeringScenario.kernelDefaultReplace(sockets: 4, replacing: 1, flows: 512).moved
        print("kernel default, 4 sockets, one replaced: \(moved) of 512 flows moved (\(moved * 100 / 512)%)")
        #expect(moved > 512 / 8, "the kernel's own reuseport moved only \(moved) flows")
    }

    /// A foreign SO_REUSEPORT socket of the same user on the same port receives nothing.
    @Test func foreignSocketOnThePortGetsNothing() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 4)
        let outcome = try SteeringScenario.foreignSocket(plane, clients: 250, rounds: 4)
        #expect(outcome.deliveries.count == 1000)
        #expect(outcome.counted == 1000)
        #expect(outcome.toForeign == 0)
    }

    /// An empty slot's flows go to the predicted fallback slot and are counted; refilling
    /// the slot brings them back (FallbackScenario: kernel-check runs it on every kernel too).
    @Test(arguments: families)
    func emptySlotFallsBackDeterministically(address: IPAddress) throws {
        let plane = try service(.udp, on: address, slots: 4)
        try FallbackScenario.run(plane, clients: try Traffic.clients(400, on: address), emptied: [2])
    }

    /// Two empty slots of eight: each one's flows spread over the six live slots.
    @Test func twoEmptySlotsFallBackDeterministically() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 8)
        try FallbackScenario.run(plane, clients: try Traffic.clients(400, on: .loopbackV4), emptied: [2, 5])
    }

    /// A closing TCP listener's queued connections are accepted from a live slot (MigrationScenario;
    /// kernel-check runs it on every kernel too).
    @Test func aClosingListenersConnectionsMigrate() throws {
        let plane = try service(.tcp, on: .loopbackV4, slots: 2)
        print(try MigrationScenario.run(plane, clients: try Traffic.clients(32, .tcp, on: .loopbackV4)))
    }

    /// A change keeps recorded flows through its switch (TransitionScenario: kernel-check runs it
    /// on every kernel too).
    @Test(arguments: [IPAddress.loopbackV4, .loopbackV6])
    func aChangeKeepsRecordedFlows(_ address: IPAddress) throws {
        let plane = try service(.udp, on: address, slots: 4)
        print(try TransitionScenario.run(plane, clients: try Traffic.clients(400, on: address),
                                         fresh: try Traffic.clients(400, on: address)))
    }

    /// A generation change: nothing reaches a starting generation; at its switch live flows stay
    /// and new flows go to it (GenerationScenario: kernel-check runs it on every kernel too).
    @Test(arguments: [IPAddress.loopbackV4, .loopbackV6])
    func aGenerationTakesNoFlowUntilItSwitches(_ address: IPAddress) throws {
        let plane = try service(.udp, on: address, slots: 4)
        print(try GenerationScenario.run(plane, clients: try Traffic.clients(400, on: address),
                                         fresh: try Traffic.clients(400, on: address)))
    }

    /// Generations never repeat a number, abandoned ones included, and at most
    /// `maxDrainingGenerations` may drain beside the working one: beyond, a new one is refused.
    @Test func generationsAreNumberedOnceAndBounded() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 2)
        var numbers = [plane.workingGeneration]
        let abandoned = try plane.startGeneration(count: 2, now: MonotonicClock.nanoseconds())
        try plane.abandonGeneration(now: MonotonicClock.nanoseconds())
        numbers.append(abandoned.generation)
        #expect(plane.liveSlots == [0, 1], "an abandoned generation's sockets are gone")
        for _ in 0..<ServiceDataPlane.maxDrainingGenerations {
            let now = MonotonicClock.nanoseconds()
            numbers.append(try plane.startGeneration(count: 2, now: now).generation)
            try plane.switchGeneration(now: now, learnNs: 0)
            try plane.advance(now: now, force: true)
        }
        #expect(numbers == [1, 2, 3, 4, 5], "\(numbers)")
        #expect(plane.workingGeneration == 5 && plane.slots == [6, 7] && plane.leaving.count == 6)
        #expect(try plane.maps.readTransition().last_generation == 5)
        #expect(throws: ReuseportError.self) { try plane.startGeneration(count: 2, now: MonotonicClock.nanoseconds()) }
        do {
            _ = try plane.startGeneration(count: 2, now: MonotonicClock.nanoseconds())
        } catch {
            #expect("\(error)".contains("generations 1, 3, 4 still drain, and at most 3 may"), "\(error)")
        }
        // One retires: the next may start, with the next number.
        for slot in plane.leaving.filter({ plane.slotGenerations[$0] == 1 }) {
            for socket in try plane.retire(slot, now: MonotonicClock.nanoseconds()) { socket.close() }
        }
        #expect(try plane.startGeneration(count: 2, now: MonotonicClock.nanoseconds()).generation == 6)
    }

    /// With no live slot the program drops and counts; it never lets the kernel choose.
    @Test func noLiveSlotDropsAndCounts() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 2)
        let foreign = try ReuseportSocket(endpoint: plane.listeners[0].endpoint)
        let destination = plane.listeners[0].endpoint.address
        // Keep the group (and its program) alive through the foreign socket.
        try plane.closeSlot(0)
        try plane.closeSlot(1)
        let clients = try Traffic.clients(20, on: .loopbackV4)
        for client in clients { try client.send([1, 2, 3], to: destination) }
        let got = try Traffic.receive(from: [7: foreign], expected: 1, idleMs: 300)
        #expect(got.isEmpty)
        #expect(try plane.maps.globalCounters().dropped_no_slot == 20)
    }

    /// Per-slot packets and payload bytes in the maps equal what was sent.
    @Test func countersEqualWhatWasSent() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 4)
        let destination = plane.listeners[0].endpoint.address
        let clients = try Traffic.clients(64, on: .loopbackV4)
        for (i, client) in clients.enumerated() {
            for j in 0..<5 { try client.send([UInt8](repeating: 7, count: 10 + i + j), to: destination) }
        }
        let deliveries = try Traffic.receive(from: sockets(plane), expected: 320)
        #expect(deliveries.count == 320)
        for slot in 0..<UInt32(4) {
            let mine = deliveries.filter { $0.slot == slot }
            let counters = try plane.maps.slotCounters(slot)
            #expect(counters.packets == UInt64(mine.count))
            #expect(counters.bytes == UInt64(mine.reduce(0) { $0 + $1.payload.count }))
            #expect(counters.fallbacks == 0)
        }
        let global = try plane.maps.globalCounters()
        #expect(global.dropped_no_slot == 0 && global.unparsable == 0 && global.select_errors == 0)
    }

    /// Pinned maps reopen, in this process and from a second one (bpftool), with the same slots.
    @Test func pinnedMapsReopenFromASecondProcess() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 4)
        let layout = PinLayout(root: TestPinRoot.unique("pins"), service: "pins")
        try plane.pin(layout)
        defer { layout.remove() }

        let reopened = try DispatchMaps(pinned: layout)
        try reopened.checkConfiguredABI()
        #expect(try reopened.readBuckets() == plane.buckets)
        let array = try SocketArray(pinned: layout, listener: 0)
        for slot in 0..<UInt32(4) {
            let cookie = try plane.listeners[0].sockets[slot]!.cookie()
            #expect(try array.cookie(at: slot) == cookie)
            let output = try Subprocess.run("/usr/sbin/bpftool", ["-j", "map", "lookup", "pinned", layout.path(ofSockets: 0),
                                                                  "key", "\(slot)", "0", "0", "0"]).output
            // bpftool prints the u64 cookie as 8 little-endian hex bytes.
            let expected = (0..<8).map { "\"0x" + String(format2(UInt8(truncatingIfNeeded: cookie >> (8 * $0)))) + "\"" }
            #expect(output.contains(expected.joined(separator: ",")), "bpftool: \(output)")
        }
        // A map opened with the wrong layout is refused with a typed error.
        #expect(throws: ReuseportError.abiMismatch(map: RP_MAP_SLOT_STATE, field: "value",
                                                   kernel: MemoryLayout<rp_slot_state>.size, expected: 16)) {
            _ = try BPFMap(pinnedAt: layout.path(ofShared: RP_MAP_SLOT_STATE), name: RP_MAP_SLOT_STATE,
                           keySize: 4, valueSize: 16)
        }
    }

    /// The bucket tables are as large as the service's bucket count, and a later daemon reads
    /// their size from the pins: it takes them over for that count only. Datagrams steered
    /// through a 64-entry table are counted by the program.
    @Test func bucketTablesAreSizedByTheConfiguration() throws {
        let options = ServiceDataPlane.Options(bucketCount: 64, seed: 0x5eed)
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4,
                                         options: options)
        #expect(plane.maps.buckets.maxEntries == 64 && plane.maps.nextBuckets.maxEntries == 64)
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let steered = try Traffic.slotsOf(clients: clients, sending: plane.listeners[0].endpoint.address,
                                          sockets: sockets(plane))
        let counted = try (0..<UInt32(4)).reduce(UInt64(0)) { $0 + (try plane.maps.slotCounters($1).packets) }
        #expect(steered.count == 64 && counted == 64)

        let layout = PinLayout(root: TestPinRoot.unique("sized"), service: "sized")
        try plane.pin(layout)
        defer { layout.remove() }
        let pinned = try #require(ServiceDataPlane.resumable(at: layout, options: options))
        #expect(pinned.buckets.maxEntries == 64 && pinned.holdsBuckets(64) && !pinned.holdsBuckets(65))
        var larger = options
        larger.bucketCount = 128
        #expect(ServiceDataPlane.resumable(at: layout, options: larger) == nil, "another bucket count starts afresh")
    }

    /// What the kernel charges for a map (`memlock:` in /proc/self/fdinfo: what kernels before
    /// 5.11 count against RLIMIT_MEMLOCK and later ones charge to the memory cgroup).
    func memlock(_ map: BPFMap) throws -> Int {
        let file = try #require(fopen("/proc/self/fdinfo/\(map.fd)", "r"))
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(cString: line)
            guard text.hasPrefix("memlock:") else { continue }
            return try #require(Int(text.dropFirst("memlock:".count).filter(\.isNumber)))
        }
        throw ReuseportError.invalidArgument("no memlock in the fdinfo of \(map.name)")
    }

    /// A service of 4 workers with default settings holds at most 1 MiB of maps: the slot-indexed
    /// maps are sized from its workers and the flow tables, whose hash buckets the kernel allocates
    /// at creation, hold 8,192 records per worker (docs/benchmarks.md, item 6; 8.3 MiB before).
    /// Every map's size is read back from the kernel (bpf_map_info), and steering still works.
    @Test func aDefaultServiceOfFourWorkersHoldsAtMostOneMebibyte() throws {
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 4)
        defer { plane.close() }
        let maps = plane.maps.all + plane.listeners.map(\.program.sockets.map)
        #expect(maps.count == DispatchMaps.names.count + 1)
        var total = 0
        var report: [String] = []
        for map in maps {
            var info = bpf_map_info()
            var length = UInt32(MemoryLayout<bpf_map_info>.size)
            #expect(bpf_obj_get_info_by_fd(map.fd, &info, &length) == 0, "bpf_obj_get_info_by_fd(\(map.name)): \(errno)")
            let bytes = try memlock(map)
            total += bytes
            report.append("\(map.name): \(info.max_entries) entries, \(bytes) B")
            switch map.name {
            case RP_MAP_SOCKETS, RP_MAP_SLOT_STATS, RP_MAP_QUIC_SLOT_STATS, RP_MAP_SLOT_STATE:
                #expect(info.max_entries == 16, "\(map.name): 4 slots per worker, at least RP_MIN_SLOT_CAPACITY")
            case RP_MAP_FLOWS:
                #expect(info.max_entries == 4 * RP_TRACKED_FLOWS_PER_WORKER)
            case RP_MAP_UNTRACKED:
                #expect(info.max_entries == RP_TRACKED_FLOWS_PER_WORKER)
            default:
                break
            }
        }
        #expect(total <= 1 << 20, "\(total) B: \(report.joined(separator: "; "))")
        #expect(plane.slotCapacity == 16 && plane.options.tracking.maxFlows == 4 * Int(RP_TRACKED_FLOWS_PER_WORKER))
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let steered = try Traffic.slotsOf(clients: clients, sending: plane.listeners[0].endpoint.address,
                                          sockets: sockets(plane))
        let counted = try (0..<UInt32(4)).reduce(UInt64(0)) { $0 + (try plane.maps.slotCounters($1).packets) }
        #expect(steered.count == 64 && counted == 64)
    }

    /// The slot-indexed maps hold the slot capacity of the workers (`SlotCapacity`): a scale or a
    /// new generation within it works, one beyond it is refused with the way out, and changes
    /// nothing. A configured max_tracked_flows is taken as it is.
    @Test func changesBeyondTheSlotCapacityAreRefused() throws {
        let tracking = ServiceDataPlane.FlowTracking(maxFlows: 100)
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                         options: .init(bucketCount: 64, tracking: tracking))
        defer { plane.close() }
        #expect(plane.maps.flows.maxEntries == 100 && plane.maps.untracked.maxEntries == RP_MIN_UNTRACKED_MARKERS)
        #expect(plane.slotCapacity == 16 && plane.listeners[0].program.sockets.map.maxEntries == 16)
        #expect(try plane.resize(to: 16) > 0)
        #expect(try plane.resize(to: 8) > 0)
        do {
            _ = try plane.resize(to: 17)
            Issue.record("a scale to 17 slots in maps of 16 was taken")
        } catch let ReuseportError.invalidArgument(message) {
            #expect(message.contains("hold 16 slots") && message.contains("reload"), "\(message)")
        }
        #expect(plane.slots == Array(0..<8) && plane.liveSlots == Array(0..<8))
        // A generation of 8 beside the 8 working slots fills the maps; one more slot does not fit.
        let starting = try plane.startGeneration(count: 8, now: MonotonicClock.nanoseconds())
        #expect(starting.slots == Array(8..<16))
        try plane.abandonGeneration(now: MonotonicClock.nanoseconds())
        #expect(throws: ReuseportError.self) { try plane.startGeneration(count: 9, now: MonotonicClock.nanoseconds()) }
        #expect(plane.liveSlots == Array(0..<8))
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let steered = try Traffic.slotsOf(clients: clients, sending: plane.listeners[0].endpoint.address,
                                          sockets: sockets(plane))
        #expect(steered.count == 64 && Set(steered.values).isSubset(of: Set(0..<8)))
    }

    /// The array's rules, with exact errno values.
    @Test func socketArrayRules() throws {
        let plane = try service(.udp, on: .loopbackV4, slots: 2)
        let array = plane.listeners[0].program.sockets
        let unbound = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "udp")
        let refused = array.map.withDescriptor { map in
            unbound.withFD { socket in bpf_map_update_elem_checked(map, key: 5, value: UInt64(socket)) }
        }
        #expect(refused == EINVAL)
        #expect(throws: ReuseportError.self) { try array.insert(plane.listeners[0].sockets[0]!, at: 3) }
        do {
            try array.insert(plane.listeners[0].sockets[0]!, at: 3)
        } catch let error as ReuseportError {
            #expect(error.errno == EBUSY)
            #expect(error.description.contains("already in the array"))
        }
        #expect(try array.cookie(at: 0) == plane.listeners[0].sockets[0]!.cookie())
        #expect(try array.cookie(at: 7) == nil)
    }
}

func format2(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
}

import CLibbpf

func bpf_map_update_elem_checked(_ fd: Int32, key: UInt32, value: UInt64) -> Int32 {
    var key = key
    var value = value
    return bpf_map_update_elem(fd, &key, &value, UInt64(BPF_ANY)) == 0 ? 0 : errno
}
