#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport

struct CtlResult: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String

    var description: String { "exit \(status)\nstdout:\n\(stdout)\nstderr:\n\(stderr)" }
}

/// Runs `reuseportctl` with `arguments`, the environment given plus COLUMNS=100 (help text
/// wraps at the terminal width), and returns its exit status and output.
func reuseportctl(_ arguments: [String], environment: [String: String] = [:]) throws -> CtlResult {
    try run(BuiltProducts.path("reuseportctl"), arguments, environment: environment)
}

func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> CtlResult {
    var env = ProcessInfo.processInfo.environment
    env["COLUMNS"] = "100"
    env.merge(environment) { $1 }
    let result = try Subprocess.run(executable, arguments, environment: env.map { "\($0.key)=\($0.value)" },
                                    captureStandardError: true)
    return CtlResult(status: result.status.shellStatus, stdout: result.output, stderr: result.errors)
}

/// A bpffs pin root of one test's own (the services pinned in it remove themselves).
struct PinRoot {
    let path: String

    init(_ label: String) {
        path = TestPinRoot.path(label)
    }
}

/// A service as the daemon would leave it, made by the test: a data plane on 127.0.0.1:0,
/// pinned under a unique root, with worker state the test writes into rp_slot_state.
final class PinnedService {
    let plane: ServiceDataPlane
    let layout: PinLayout
    var endpoint: Endpoint { plane.listeners[0].endpoint }

    init(root: PinRoot, name: String = "svc", transport: Transport = .udp, address: IPAddress = .loopbackV4,
         slots: Int = 4, seed: UInt32 = 0x5eed, bucketCount: Int = 64, receiveBuffer: Int? = nil,
         extraListeners: [Endpoint] = [], quic: QuicSteering? = nil) throws {
        plane = try ServiceDataPlane(endpoints: [Endpoint(transport, SocketAddress(address, 0))] + extraListeners,
                                     slotCount: slots,
                                     options: .init(bucketCount: bucketCount, seed: seed, receiveBuffer: receiveBuffer,
                                                    quic: quic))
        layout = PinLayout(root: root.path, service: name)
        try plane.pin(layout)
    }

    /// Writes rp_slot_state for `slot` as the daemon does.
    func setState(_ slot: UInt32, pid: UInt32, state: WorkerState, restarts: UInt32 = 0, since: UInt64) throws {
        let cookie = try plane.listeners[0].sockets[slot]?.cookie() ?? 0
        try plane.publish(rp_slot_state(pid: pid, state: state.rawValue, restarts: restarts, generation: 1,
                                        since_ns: since, socket_cookie: cookie, stalls: 0,
                                        watchdog_restarts: 0, records: 0, flags: 0, start_time: 0), slot: slot)
    }

    func cookie(_ slot: UInt32) throws -> UInt64 { try plane.listeners[0].sockets[slot]!.cookie() }

    deinit {
        plane.close()
        layout.remove()
    }
}

/// Sends one datagram of `size` bytes from each client and returns the slot each landed on.
func sendAndReceive(_ clients: [FlowClient], to service: PinnedService, size: Int = 10) throws -> [SocketAddress: UInt32] {
    for client in clients { try client.send([UInt8](repeating: 0x61, count: size), to: service.endpoint.address) }
    let deliveries = try Traffic.receive(from: service.plane.listeners[0].sockets, expected: clients.count)
    var slots: [SocketAddress: UInt32] = [:]
    for delivery in deliveries { slots[delivery.source] = delivery.slot }
    return slots
}

func decodeJSON(_ text: String) throws -> Any {
    try JSONSerialization.jsonObject(with: Data(text.utf8))
}
