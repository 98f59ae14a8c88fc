#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit
import ReuseportTestSupport

/// How a group of receiving sockets on one port chooses a socket for each datagram.
enum Selection: String, CaseIterable {
    /// One socket, all workers read it (no SO_REUSEPORT choice at all).
    case oneSocket = "one socket"
    /// N sockets with SO_REUSEPORT, no program: the kernel's hash over socket positions.
    case kernel = "kernel reuseport"
    /// N sockets, bpf/baseline.bpf.c rp_base_pass attached (returns SK_PASS, no selection).
    case emptyProgram = "empty program"
    /// N sockets, rp_base_fixed attached (always the socket at slot 0).
    case fixedSlot = "fixed-slot program"
    /// N sockets, rp_base_load attached (copies out the IP addresses, then slot 0).
    case addressLoad = "fixed slot + address load"
    /// reuseportd's data plane: rp_dispatch with its bucket table (ServiceDataPlane).
    case steering = "reuseportd steering"
    /// rp_dispatch at the Makefile's BENCH_REFERENCE (746545c: before QUIC steering and flow
    /// tracking), built from git, with the seed and bucket table of `.steering`.
    case reference = "reference program"
    /// The same with QUIC steering (QuicScenario.steering), sent QUIC short headers whose CID
    /// names a live slot: the connection-ID path.
    case quicShort = "QUIC short header, by CID"
    /// ... sent QUIC v1 Initials (1200 octets) with a client-chosen DCID: steered by its hash.
    case quicInitial = "QUIC Initial, by DCID hash"
    /// ... sent short headers whose CID is not of the layout: the QUIC parse, then flow steering.
    case quicUnknown = "QUIC unknown CID, then by flow"

    /// What the sender puts in every datagram (nil: 64 octets of 0x5a).
    var payload: [UInt8]? {
        switch self {
        case .quicShort:
            QuicHeader.short(dcid: QuicScenario.steering.connectionID(slot: 1, nonce: [1, 2, 3, 4, 5, 6, 7, 8]),
                             body: [UInt8](repeating: 0x5a, count: 51))
        case .quicInitial: QuicHeader.initial(dcid: [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08])
        case .quicUnknown: [0x40, 0xff] + [UInt8](repeating: 0x5a, count: 62)
        default: nil
        }
    }

    var isQuic: Bool { payload != nil }
}

/// Sockets bound to one loopback port (a port of their own, chosen by the kernel), with
/// the program of `selection` attached.
final class SocketGroup {
    let selection: Selection
    let destination: SocketAddress
    private(set) var sockets: [ReuseportSocket]
    let plane: ServiceDataPlane?
    let baseline: BaselineProgram?
    private(set) var reference: ReferenceProgram?
    /// Another program attached in place of the plane's own (item 7: other builds of rp_dispatch,
    /// bpf/flow_key_cost.bpf.c), sharing its socket array.
    private(set) var replacement: (any ReuseportProgram)?

    static let receiveBuffer = 4 << 20

    init(_ selection: Selection, sockets count: Int, address: IPAddress,
         bucketCount: Int = Int(RP_DEFAULT_BUCKETS)) throws
    {
        self.selection = selection
        let endpoint = Endpoint(.udp, SocketAddress(address, 0))
        switch selection {
        case .steering, .quicShort, .quicInitial, .quicUnknown:
            let plane = try ServiceDataPlane(endpoints: [endpoint], slotCount: count,
                                             options: .init(bucketCount: bucketCount, seed: 0x5eed,
                                                            receiveBuffer: Self.receiveBuffer,
                                                            quic: selection.isQuic ? QuicScenario.steering : nil))
            self.plane = plane
            baseline = nil
            reference = nil
            sockets = (0..<UInt32(count)).map { plane.listeners[0].sockets[$0]! }
        default:
            plane = nil
            let first = try ReuseportSocket(endpoint: endpoint, receiveBuffer: Self.receiveBuffer)
            let size = selection == .oneSocket ? 1 : count
            sockets = [first]
            for _ in 1..<max(size, 1) {
                sockets.append(try ReuseportSocket(endpoint: first.endpoint, receiveBuffer: Self.receiveBuffer))
            }
            reference = nil
            switch selection {
            case .emptyProgram:
                let program = try BaselineProgram(.pass)
                try first.attach(program)
                baseline = program
            case .fixedSlot, .addressLoad:
                let program = try BaselineProgram(selection == .fixedSlot ? .fixedSlot : .addressLoad)
                try first.attach(program)
                for (slot, socket) in sockets.enumerated() { try program.sockets.insert(socket, at: UInt32(slot)) }
                baseline = program
            default:
                baseline = nil
            }
        }
        if selection == .reference {
            let program = try Self.referenceProgram(sockets: count, bucketCount: bucketCount)
            try sockets[0].attach(program)
            for (slot, socket) in sockets.enumerated() { try program.sockets.insert(socket, at: UInt32(slot)) }
            reference = program
        }
        destination = sockets[0].endpoint.address
    }

    /// A group over `plane`'s first listener (its slots' sockets, in slot order).
    init(plane: ServiceDataPlane) {
        selection = .steering
        self.plane = plane
        baseline = nil
        reference = nil
        sockets = plane.liveSlots.compactMap { plane.listeners[0].sockets[$0] }
        destination = sockets[0].endpoint.address
    }

    /// Attaches `program` (sharing the plane's socket array, and its maps if it is a build of
    /// rp_dispatch) in place of the plane's: the same sockets, another program.
    func replaceProgram(with program: any ReuseportProgram) throws {
        try sockets[0].attach(program)
        replacement = program
    }

    /// Attaches the plane's own program again, after `replaceProgram`.
    func restoreProgram() throws {
        guard let plane else { return }
        try sockets[0].attach(plane.listeners[0].program)
        replacement = nil
    }

    var fds: [Int32] { sockets.map { $0.fd.rawValue } }

    /// The attached program, if any (for its run-time statistics).
    var program: (any ReuseportProgram)? {
        if let replacement { return replacement }
        if let plane { return plane.listeners[0].program }
        if let reference { return reference }
        return baseline
    }

    /// The revision the reference program was built at; nil when `make` could not build it (no git).
    static var referenceRevision: String? {
        rp_bench_reference_object_size() > 0 ? String(cString: rp_bench_reference_revision()) : nil
    }

    /// The reference program, with the seed and the even bucket table `.steering` gets.
    private static func referenceProgram(sockets count: Int, bucketCount: Int) throws -> ReferenceProgram {
        guard let revision = referenceRevision, let object = rp_bench_reference_object() else {
            throw BenchError("the reference program was not built (make builds it from git)")
        }
        var config = [UInt8](repeating: 0, count: 256)
        let size = rp_bench_reference_config(&config, config.count, 0x5eed, UInt32(bucketCount), UInt32(count))
        guard size > 0 else { throw BenchError("no rp_config layout for the reference program \(revision)") }
        return try ReferenceProgram(object: object, count: rp_bench_reference_object_size(),
                                    name: "dispatch.bpf.o at \(revision)", config: Array(config.prefix(size)),
                                    buckets: BucketAssignment.initial(bucketCount: bucketCount,
                                                                      slots: Array(0..<UInt32(count))))
    }

    /// Adds a socket to the group (kernel reuseport: it joins at the end).
    func addSocket() throws {
        sockets.append(try ReuseportSocket(endpoint: sockets[0].endpoint, receiveBuffer: Self.receiveBuffer))
    }

    /// Closes the socket at `index`.
    func removeSocket(at index: Int) {
        sockets.remove(at: index).close()
    }

    func close() {
        plane?.close()
        for socket in sockets { socket.close() }
    }
}

/// Where the sender and the receivers run.
struct CPUPlan {
    var sender: Int?
    var receivers: Int?

    /// The first allowed CPU sends, the second receives; with one CPU nothing is pinned.
    static func choose() -> CPUPlan {
        let cpus = allowedCPUs()
        return cpus.count >= 2 ? CPUPlan(sender: cpus[0], receivers: cpus[1]) : CPUPlan()
    }

    var text: String {
        guard let sender, let receivers else { return "not pinned (one CPU)" }
        return "sender on CPU \(sender), every receiver on CPU \(receivers)"
    }
}

/// One timed run: receivers on `group`, the sender blasting at it from `flows`.
struct TrialResult {
    var send: SendResult
    var delivered: UInt64
    var perReceiver: [UInt64]
    var receiverCPUSeconds: Double

    var deliveredRate: Double { send.seconds > 0 ? Double(delivered) / send.seconds : 0 }

    /// Two runs of the same variant as one.
    static func + (a: TrialResult, b: TrialResult) -> TrialResult {
        var send = a.send
        send.sent += b.send.sent
        send.failedCalls += b.send.failedCalls
        send.seconds += b.send.seconds
        send.userSeconds += b.send.userSeconds
        send.systemSeconds += b.send.systemSeconds
        return TrialResult(send: send, delivered: a.delivered + b.delivered,
                           perReceiver: zip(a.perReceiver, b.perReceiver).map { $0 + $1 },
                           receiverCPUSeconds: a.receiverCPUSeconds + b.receiverCPUSeconds)
    }
    /// Delivered datagrams per second of the sender's CPU time (it runs the receive path too).
    var deliveredPerCPUSecond: Double {
        let cpu = send.userSeconds + send.systemSeconds
        return cpu > 0 ? Double(delivered) / cpu : 0
    }
    var lost: Int { max(send.sent - Int(delivered), 0) }
}

func runTrial(_ group: SocketGroup, flows: FlowSet, workers: Int, seconds: Double, cpus: CPUPlan,
              payloadSize: Int = 64) -> TrialResult
{
    let payload = group.selection.payload
    let receivers = ReceiverGroup(fds: group.fds, threads: workers, cpu: cpus.receivers)
    pause(0.01)
    var send = SendResult()
    let destination = group.destination
    let sender = PinnedThread(cpu: cpus.sender) {
        send = blast(from: flows, to: destination, seconds: seconds, payloadSize: payload?.count ?? payloadSize,
                     payload: payload)
    }
    sender.join()
    let received = receivers.stop()
    return TrialResult(send: send, delivered: received.counts.reduce(0, +), perReceiver: received.counts,
                       receiverCPUSeconds: received.cpuSeconds)
}
