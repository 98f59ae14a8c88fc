#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport

/// The process calls a daemon needs to adopt the workers of a previous one: pidfd_open (5.3),
/// pidfd_getfd (5.6) on a socket another process holds, pidfd_send_signal (5.1), and a pidfd
/// that becomes readable when its process exits.
enum ProcessChecks {
    static let all: [Check] = [pidfdSocket]

    static let pidfdSocket = Check(
        "pidfd-getfd-socket",
        "pidfd_open a child holding a SO_REUSEPORT socket at fd 3, copy it out with pidfd_getfd (same cookie), "
            + "SIGKILL it with pidfd_send_signal, see the pidfd readable",
        breakable: true
    ) { context in
        let socket = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(.loopbackV4, 0)))
        let cookie = try socket.cookie()
        let staged = try Syscall.duplicate(socket.fd, atLeast: 10)
        let pid = try ProcessSpawn(BuiltProducts.selfPath, [BuiltProducts.selfPath, "hold"], environment: nil,
                                   fileActions: [.nullInput, .duplicate(staged.fd.rawValue, to: 3)]).start()
        staged.close()
        defer {
            kill(pid, SIGKILL)
            _ = try? Syscall.wait(pid, block: true)
        }
        let pidfd = try Syscall.pidfdOpen(pid)
        // The child may not have run its dup2 yet: wait until its fd 3 is the socket.
        var copied: UInt64?
        let deadline = MonotonicClock.milliseconds() + 5000
        while copied != cookie && MonotonicClock.milliseconds() < deadline {
            if let copy = try? Syscall.pidfdGetDescriptor(pidfd, 3) {
                copied = try? Syscall.getOption(copy.fd.rawValue, SOL_SOCKET, SO_COOKIE, UInt64.self, "SO_COOKIE")
            }
            if copied != cookie { usleep(10_000) }
        }
        context.record("cookie", cookie)
        context.record("copied_cookie", copied.map(String.init) ?? "none")
        let expected = context.broken ? cookie &+ 1 : cookie
        try context.expect(copied == expected, "pidfd_getfd(3) gave cookie \(copied.map(String.init) ?? "none"), expected \(expected)")
        try Syscall.pidfdSignal(pidfd, SIGKILL)
        var entry = pollfd(fd: pidfd.fd.rawValue, events: Int16(POLLIN), revents: 0)
        let ready = poll(&entry, 1, 5000)
        try context.expect(ready == 1 && entry.revents & Int16(POLLIN) != 0, "the pidfd did not become readable after SIGKILL")
        let status = try Syscall.wait(pid, block: true)?.status
        try context.expect(status == .killed(signal: SIGKILL), "the child ended \(String(describing: status))")
        return "socket copied out of pid \(pid) with its cookie \(cookie); pidfd readable once SIGKILL ended it"
    }
}
