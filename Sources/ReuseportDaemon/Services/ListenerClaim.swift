#if canImport(Glibc)
import Glibc
#endif
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
    /// Throws `DaemonError.listenerTaken` if a reuseport group holds `endpoint`. A holder without SO_REUSEPORT is
    /// left to the real bind, whose EADDRINUSE then names the address.
    static func checkFree(_ endpoint: Endpoint) throws {
        guard endpoint.address.port != 0, !probeBinds(endpoint, reusePort: false), probeBinds(endpoint, reusePort: true)
        else { return }
        throw DaemonError.listenerTaken(endpoint)
    }

    /// Whether a fresh socket can bind `endpoint` now (errors other than EADDRINUSE count as yes:
    /// the real bind will report them).
    static func probeBinds(_ endpoint: Endpoint, reusePort: Bool) -> Bool {
        let type = endpoint.transport == .udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue)
        guard let probe = try? Syscall.socket(endpoint.address.address.family, type, "probe \(endpoint)") else { return true }
        if reusePort { try? Syscall.setOption(probe.fd, SOL_SOCKET, SO_REUSEPORT, Int32(1), "SO_REUSEPORT") }
        if endpoint.transport == .tcp { try? Syscall.setOption(probe.fd, SOL_SOCKET, SO_REUSEADDR, Int32(1), "SO_REUSEADDR") }
        // As the daemon binds: IPv6 sockets are v6-only.
        if endpoint.address.address.family == AF_INET6 {
            try? Syscall.setOption(probe.fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, Int32(1), "IPV6_V6ONLY")
        }
        do {
            try withExtendedLifetime(probe) {
                try Syscall.bind(probe.fd, endpoint.address, "\(endpoint)")
                // Bound with SO_REUSEPORT, the probe joined the holders' group: it leaves the port
                // before it closes, or its close could swallow one of their datagrams
                // (ReuseportSocket.leavePort).
                if reusePort, endpoint.transport == .udp, (try? ReuseportSocket.leavePort(probe.fd, "probe \(endpoint)")) != nil {
                    // What a lookup under way still put into it is the holders': dropped, but not
                    // by a close that would free it unseen while lookups still meet the probe.
                    Syscall.waitForInFlightLookups()
                }
            }
            return true
        } catch {
            return (error as? ReuseportError)?.errno != EADDRINUSE
        }
    }
}
