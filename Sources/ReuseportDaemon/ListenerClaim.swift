#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import ReuseportKit

/// Before binding a service's sockets: is the address free?
///
/// The daemon binds with SO_REUSEPORT, so a socket of the same user already bound there
/// (another reuseportd, or any server using SO_REUSEPORT) would not stop it: the daemon's
/// sockets would join that group and attaching the program would replace the other owner's.
/// A probe bound *without* SO_REUSEPORT fails with EADDRINUSE while any socket holds the
/// address, while one bound *with* SO_REUSEPORT succeeds only if the holders are a reuseport
/// group of this user: both together identify the case. (TCP probes set SO_REUSEADDR so that
/// connections in TIME_WAIT from an earlier run do not count.)
enum ListenerClaim {
    struct Taken: Error, CustomStringConvertible {
        var endpoint: Endpoint
        var description: String {
            "\(endpoint) is already bound by another socket (another reuseportd, or a server using SO_REUSEPORT): "
                + "joining its reuseport group would take over that group's traffic, so the daemon will not start it"
        }
    }

    /// Throws `Taken` if a reuseport group holds `endpoint`. A holder without SO_REUSEPORT is
    /// left to the real bind, whose EADDRINUSE then names the address.
    static func checkFree(_ endpoint: Endpoint) throws {
        guard endpoint.address.port != 0, !probeBinds(endpoint, reusePort: false), probeBinds(endpoint, reusePort: true)
        else { return }
        throw Taken(endpoint: endpoint)
    }

    /// Whether a fresh socket can bind `endpoint` now (errors other than EADDRINUSE count as yes:
    /// the real bind will report them).
    static func probeBinds(_ endpoint: Endpoint, reusePort: Bool) -> Bool {
        let type = endpoint.transport == .udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue)
        let probe = socket(endpoint.address.address.family, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { return true }
        defer { close(probe) }
        var one: Int32 = 1
        let size = socklen_t(MemoryLayout<Int32>.size)
        if reusePort { setsockopt(probe, SOL_SOCKET, SO_REUSEPORT, &one, size) }
        if endpoint.transport == .tcp { setsockopt(probe, SOL_SOCKET, SO_REUSEADDR, &one, size) }
        // As the daemon binds: IPv6 sockets are v6-only.
        if endpoint.address.address.family == AF_INET6 { setsockopt(probe, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, size) }
        let bound = endpoint.address.withSockaddr { bind(probe, $0, $1) }
        return bound == 0 || errno != EADDRINUSE
    }
}
