#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// Item 5: how evenly 100k flows spread: the busiest worker's flows over the mean.
///
/// Each flow is one datagram from its own (source address, source port): sockets bound
/// one after another to 127.77.x.y on ports 20000-59999 (addresses of 127/8 are all local,
/// and ports explicitly chosen never repeat a tuple), sent once and closed.
struct BalanceBench {
    static let workerCounts = [4, 16, 64]
    static let selections: [Selection] = [.kernel, .steering]

    /// N → selection → busiest/mean, one per repeat (each repeat a different set of flows).
    var ratios: [Int: [Selection: [Double]]] = [:]
    var flows = 0
    var lost = 0

    static func run(_ settings: Settings) throws -> BalanceBench {
        var result = BalanceBench()
        let cpus = CPUPlan.choose()
        result.flows = settings.balanceFlows
        let repeats = max(1, settings.scaleRepeats)
        for rep in 0..<repeats {
            for n in workerCounts {
                for selection in interleaved(selections, repeat: rep) {
                    let group = try SocketGroup(selection, sockets: n, address: .loopbackV4)
                    defer { group.close() }
                    let receivers = ReceiverGroup(fds: group.fds, threads: min(n, 4), cpu: cpus.receivers)
                    var sent = 0
                    var failure: Error?
                    let destination = group.destination
                    let sender = PinnedThread(cpu: cpus.sender) {
                        do {
                            sent = try sendOnePerFlow(settings.balanceFlows, to: destination, addressBlock: UInt8(rep + 1))
                        } catch {
                            failure = error
                        }
                    }
                    sender.join()
                    let counts = receivers.stop().counts
                    if let failure { throw failure }
                    result.lost += sent - Int(counts.reduce(0, +))
                    result.ratios[n, default: [:]][selection, default: []].append(imbalance(counts))
                }
            }
            Log.note("  balance: repeat \(rep + 1)/\(repeats) done")
        }
        return result
    }
}

/// Sends one datagram from each of `count` distinct source tuples 127.77.<block>.z:port.
/// A tuple whose bind fails (a port someone else holds) is skipped for the next.
func sendOnePerFlow(_ count: Int, to destination: SocketAddress, addressBlock: UInt8) throws -> Int {
    var sent = 0
    let payload: [UInt8] = Array("balance".utf8)
    var host: UInt8 = 1
    var port: UInt16 = 20000
    while sent < count {
        let source = SocketAddress(IPAddress(bytes: [127, 77, addressBlock, host])!, port)
        port += 1
        if port == 60000 {
            port = 20000
            guard host < 250 else { throw BenchError("ran out of source tuples after \(sent) flows") }
            host += 1
        }
        let client = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "udp")
        defer { client.close() }
        // A source tuple another socket holds is skipped.
        do { try Syscall.bind(client.fd, source, "\(source)") } catch { continue }
        try payload.withUnsafeBytes { _ = try Syscall.send(client.fd, $0, to: destination) }
        sent += 1
    }
    return sent
}
