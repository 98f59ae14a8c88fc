#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 4: the share of flows that change worker when the worker count grows N → N+1
/// and shrinks back N+1 → N, kernel default against the real daemon (SIGHUP with a new
/// worker count), beside the ideal 1/(N+1).
struct ResizeBench {
    static let sizes = [2, 4, 8, 16]

    struct Step {
        var from: Int
        var to: Int
        var kernel: Double?
        var reuseportd: Double?
        var ideal: Double { 1 / Double(max(from, to)) }
        var limit: Double { 1.1 * ideal }
    }

    var steps: [Step] = []
    var flows = 0
    var unanswered = 0
    var error: String?

    static func run(_ settings: Settings, daemonBinary: String) throws -> ResizeBench {
        var result = ResizeBench()
        let flows = try FlowSet(count: settings.resizeFlows, address: .loopbackV4)
        result.flows = flows.fds.count
        for n in sizes {
            result.steps.append(Step(from: n, to: n + 1))
            result.steps.append(Step(from: n + 1, to: n))
        }
        // Kernel default: N sockets with SO_REUSEPORT, one more joins, then leaves again.
        for n in sizes {
            let group = try SocketGroup(.kernel, sockets: n, address: .loopbackV4)
            defer { group.close() }
            let before = try probeKernelGroup(flows, to: group.destination, sockets: group.fds)
            try group.addSocket()
            let grown = try probeKernelGroup(flows, to: group.destination, sockets: group.fds)
            group.removeSocket(at: n)
            let shrunk = try probeKernelGroup(flows, to: group.destination, sockets: group.fds)
            result.unanswered += 3 * flows.fds.count - before.count - grown.count - shrunk.count
            result.set(n, n + 1, kernel: movedShare(before, grown))
            result.set(n + 1, n, kernel: movedShare(grown, shrunk))
        }
        Log.note("  resize: kernel default done")
        // reuseportd: one daemon, SIGHUP with each worker count in turn.
        guard access(daemonBinary, X_OK) == 0 else {
            result.error = "no reuseportd binary at \(daemonBinary)"
            return result
        }
        let daemon = try DaemonProcess(binary: daemonBinary, workers: sizes[0])
        defer { daemon.stop() }
        for n in sizes {
            if n != sizes[0] { try daemon.reload(workers: n) }
            let before = try settledPlacement(flows, daemon, slots: n)
            try daemon.reload(workers: n + 1)
            let grown = try settledPlacement(flows, daemon, slots: n + 1)
            try daemon.reload(workers: n)
            let shrunk = try settledPlacement(flows, daemon, slots: n)
            result.set(n, n + 1, reuseportd: movedShare(before, grown))
            result.set(n + 1, n, reuseportd: movedShare(grown, shrunk))
            Log.note("  resize: reuseportd \(n) -> \(n + 1) -> \(n) done")
        }
        return result
    }

    mutating func set(_ from: Int, _ to: Int, kernel: Double? = nil, reuseportd: Double? = nil) {
        guard let index = steps.firstIndex(where: { $0.from == from && $0.to == to }) else { return }
        if let kernel { steps[index].kernel = kernel }
        if let reuseportd { steps[index].reuseportd = reuseportd }
    }
}

/// Each flow's slot once the daemon serves exactly slots 0..<slots: probes until every
/// flow is answered, the answers name exactly those slots, and two probes in a row agree
/// (a reload takes effect a moment after SIGHUP, its bucket writes are not one atomic
/// step, and a new slot answers once its worker has started).
func settledPlacement(_ flows: FlowSet, _ daemon: DaemonProcess, slots: Int, timeout: Double = 15) throws -> [Int: Int] {
    let deadline = MonotonicClock.seconds() + timeout
    var previous: [Int: Int]?
    while MonotonicClock.seconds() < deadline {
        if daemon.hasExited { throw BenchError("reuseportd exited; its log:\n\(daemon.log)") }
        let answers = try probe(flows, to: daemon.destination, timeout: 0.5)
        let placement = answers.mapValues { Int($0.slot) }
        if placement.count == flows.fds.count && Set(placement.values) == Set(0..<slots) {
            if placement == previous { return placement }
            previous = placement
        } else {
            previous = nil
        }
        pause(0.1)
    }
    throw BenchError("reuseportd did not settle on \(slots) slots within \(Int(timeout)) s; its log:\n\(daemon.log)")
}
