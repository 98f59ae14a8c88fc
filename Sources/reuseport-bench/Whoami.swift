#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit
import ReuseportTestSupport

/// The real daemon (ReuseportTestSupport's launcher) with one whoami service on a free
/// loopback port, for items 3 and 4. Its built-in whoami workers answer each datagram with
/// `slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>`, a newline, then the payload.
final class DaemonProcess {
    let daemon: TestDaemon
    let destination: SocketAddress

    /// Starts `binary` with one whoami service of `workers` workers on a free loopback port.
    init(binary: String, workers: Int) throws {
        destination = try freeUDPPort(on: .loopbackV4)
        daemon = try TestDaemon(config: Self.config(destination: destination, workers: workers), binary: binary,
                                pinRoot: TestPinRoot.unique("bench"), logLevel: "notice")
    }

    /// The configuration: whoami workers; a worker counts as healthy after 1 s (the default
    /// is 10 s), so that killing every worker in turn restarts each at once, with no back-off.
    /// Flow tracking is off: item 4 measures how many flows the bucket table itself moves (item 7
    /// shows that with tracking no live flow moves).
    static func config(destination: SocketAddress, workers: Int) -> String {
        """
        [[service]]
        name = "bench"
        listen = ["udp://\(destination)"]
        workers = \(workers)
        builtin = "whoami"
        healthy_after_ms = 1000
        flow_tracking = false

        """
    }

    /// Rewrites the worker count and sends SIGHUP (the daemon reloads and resizes).
    func reload(workers: Int) throws {
        try daemon.rewriteConfig(Self.config(destination: destination, workers: workers))
        daemon.signal(SIGHUP)
    }

    var log: String { daemon.log }

    var hasExited: Bool { daemon.checkExited() != nil }

    /// SIGTERM, then SIGKILL after 5 s; the launcher removes the folder and any pins left.
    func stop() { daemon.stop(timeoutMs: 5000) }
}

/// A loopback UDP port that was free a moment ago (bound once, then closed).
func freeUDPPort(on address: IPAddress) throws -> SocketAddress {
    let socket = try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(address, 0)))
    defer { socket.close() }
    return socket.endpoint.address
}

/// Sends one datagram from every flow to whoami workers (in chunks, so that no queue
/// overflows) and returns each flow's answer, by flow index.
func probe(_ flows: FlowSet, to destination: SocketAddress, chunk: Int = 256, timeout: Double = 2)
    throws -> [Int: WhoamiReply]
{
    var answers: [Int: WhoamiReply] = [:]
    var buffer = [UInt8](repeating: 0, count: 2048)
    let epoll = try EpollSet(flows.fds)
    for start in stride(from: 0, to: flows.fds.count, by: chunk) {
        let indices = start..<min(start + chunk, flows.fds.count)
        for index in indices {
            var payload = UInt32(index).littleEndian
            let sent = destination.withSockaddr { address, length in
                sendto(flows.fds[index], &payload, 4, 0, address, length)
            }
            if sent < 0 { throw BenchError.system("sendto(\(destination))") }
        }
        let deadline = MonotonicClock.seconds() + timeout
        while indices.contains(where: { answers[$0] == nil }) && MonotonicClock.seconds() < deadline {
            for index in epoll.wait(timeoutMs: 20) {
                while true {
                    let count = buffer.withUnsafeMutableBytes { recv(flows.fds[index], $0.baseAddress, $0.count, rp_bench_MSG_DONTWAIT) }
                    if count <= 0 { break }
                    if let reply = WhoamiReply(buffer[0..<count]) { answers[index] = reply }
                }
            }
        }
    }
    return answers
}

/// For each flow, the index of the socket in `sockets` that receives its datagram.
func probeKernelGroup(_ flows: FlowSet, to destination: SocketAddress, sockets: [Int32], chunk: Int = 256,
                      timeout: Double = 2) throws -> [Int: Int]
{
    var answers: [Int: Int] = [:]
    var payload = UInt32(0)
    let epoll = try EpollSet(sockets)
    for start in stride(from: 0, to: flows.fds.count, by: chunk) {
        let indices = start..<min(start + chunk, flows.fds.count)
        for index in indices {
            payload = UInt32(index).littleEndian
            let sent = destination.withSockaddr { sendto(flows.fds[index], &payload, 4, 0, $0, $1) }
            if sent < 0 { throw BenchError.system("sendto(\(destination))") }
        }
        let deadline = MonotonicClock.seconds() + timeout
        while indices.contains(where: { answers[$0] == nil }) && MonotonicClock.seconds() < deadline {
            for socket in epoll.wait(timeoutMs: 20) {
                while true {
                    let count = recv(sockets[socket], &payload, 4, rp_bench_MSG_DONTWAIT)
                    if count < 4 { break }
                    answers[Int(UInt32(littleEndian: payload))] = socket
                }
            }
        }
    }
    return answers
}

/// An epoll set over fds; `wait` answers the indices of the readable ones.
final class EpollSet {
    let fd: Int32
    private var events: [epoll_event]

    init(_ fds: [Int32]) throws {
        fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        if fd < 0 { throw BenchError.system("epoll_create1") }
        events = [epoll_event](repeating: epoll_event(), count: 256)
        for (index, member) in fds.enumerated() {
            var event = epoll_event()
            event.events = EPOLLIN.rawValue
            event.data.u64 = UInt64(index)
            if epoll_ctl(fd, EPOLL_CTL_ADD, member, &event) != 0 { throw BenchError.system("epoll_ctl") }
        }
    }

    deinit { close(fd) }

    func wait(timeoutMs: Int32) -> [Int] {
        let ready = epoll_wait(fd, &events, Int32(events.count), timeoutMs)
        guard ready > 0 else { return [] }
        return events[0..<Int(ready)].map { Int($0.data.u64) }
    }
}
