#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport

/// The slot of every bucket, read from the pinned table.
func pinnedBuckets(_ daemon: TestDaemon, service: String) throws -> [UInt32] {
    try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: service)).readBuckets()
}

func udpEndpoint(_ services: [ServiceStatus], _ name: String) throws -> SocketAddress {
    guard let service = services.first(where: { $0.name == name }),
          let text = service.listeners.first(where: { $0.hasPrefix("udp://") })
    else { throw HarnessError("service \(name) has no UDP listener in \(services)") }
    return try Endpoint(parsing: text).address
}

/// One `[[service]]` table for a test configuration.
func serviceTable(_ name: String, listen: [String] = ["udp://127.0.0.1:0"], workers: Int,
                  program: String = "builtin = \"whoami\"", extra: String = "") -> String {
    """
    [[service]]
    name = "\(name)"
    listen = [\(listen.map { "\"\($0)\"" }.joined(separator: ", "))]
    workers = \(workers)
    \(program)
    \(extra)

    """
}

/// The kernel's receive drops (/proc/net/udp and udp6, last column) of every UDP socket bound to
/// one of `ports`: datagrams that did not fit a socket's receive buffer.
func kernelUDPDrops(ports: Set<UInt16>) -> Int {
    var drops = 0
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = (try? String(contentsOfFile: table, encoding: .utf8)) ?? ""
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count >= 13, let colon = fields[1].lastIndex(of: ":"),
                  let port = UInt16(fields[1][fields[1].index(after: colon)...], radix: 16), ports.contains(port)
            else { continue }
            drops += Int(fields[fields.count - 1]) ?? 0
        }
    }
    return drops
}
