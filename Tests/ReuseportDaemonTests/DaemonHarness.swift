#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport

/// Failures of the harness itself, with what it was waiting for and the daemon's log.
struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Monotonic milliseconds, for timing in tests.
func nowMs() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) * 1000 + Double(time.tv_nsec) / 1_000_000
}

func sleepMs(_ ms: Int) { usleep(useconds_t(ms * 1000)) }

/// The real `reuseportd` binary, built beside this test bundle by `swift build` / `swift test`.
enum DaemonBinary {
    static let path: String = {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        let me = String(decoding: buffer[0..<max(count, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (me as NSString).deletingLastPathComponent + "/reuseportd"
    }()

    static var exists: Bool { access(path, X_OK) == 0 }
}

/// A temporary folder, removed with its contents.
final class TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/reuseportd-test-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw HarnessError("mkdtemp: \(String(cString: strerror(errno)))") }
        path = String(cString: made)
    }

    func write(_ name: String, _ text: String) throws -> String {
        let file = "\(path)/\(name)"
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Waits for `pid` to exit; returns its exit status (or 128 + signal), nil on timeout.
func waitExit(_ pid: pid_t, timeoutMs: Int) -> Int32? {
    let deadline = nowMs() + Double(timeoutMs)
    while true {
        var status: Int32 = 0
        let result = waitpid(pid, &status, WNOHANG)
        if result == pid {
            let signal = status & 0x7f
            return signal == 0 ? (status >> 8) & 0xff : 128 + signal
        }
        if result < 0 { return nil }
        if nowMs() > deadline { return nil }
        sleepMs(10)
    }
}

/// Whether a process with this pid exists (and is not a zombie of ours).
func processExists(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    let status = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
    return !status.contains(") Z ")
}

/// One run of the real daemon with its own configuration, pin root, run folder and log.
final class DaemonUnderTest {
    nonisolated(unsafe) static var counter = 0
    let directory: TemporaryDirectory
    let configPath: String
    let pinRoot: String
    let runDirectory: String
    let logPath: String
    let pid: pid_t
    private(set) var exitStatus: Int32?

    /// `pinRoot`: reuse another run's pin root (default: a fresh one).
    init(config: String, pinRoot: String? = nil) throws {
        guard DaemonBinary.exists else { throw HarnessError("no reuseportd binary at \(DaemonBinary.path): run swift build") }
        directory = try TemporaryDirectory()
        configPath = try directory.write("reuseportd.toml", config)
        DaemonUnderTest.counter += 1
        self.pinRoot = pinRoot ?? "/sys/fs/bpf/reuseportd-test-\(getpid())-\(DaemonUnderTest.counter)"
        runDirectory = "\(directory.path)/run"
        logPath = "\(directory.path)/daemon.log"
        pid = try spawn([DaemonBinary.path, "--config", configPath, "--pin-dir", self.pinRoot, "--run-dir", runDirectory,
                         "--log-level", "debug"], output: logPath)
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func rewriteConfig(_ config: String) throws {
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// A connected client of the control socket (closed by the caller), reads time out after 30 s.
    func connectControl() throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw HarnessError("socket(AF_UNIX)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = ControlDefaults.socketPath(runDirectory: runDirectory)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            close(fd)
            throw HarnessError("connect(\(path)): \(String(cString: strerror(errno)))")
        }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    /// Writes `bytes` to the control socket and reads until the daemon's answer line ends
    /// or it closes. Returns what arrived (nil: closed without a byte).
    func exchange(_ bytes: [UInt8]) throws -> [UInt8]? {
        let fd = try connectControl()
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let written = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if written <= 0 { break }  // the daemon may close on an oversized request
            offset += written
        }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !received.contains(0x0a) {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        return received.isEmpty ? nil : received
    }

    /// Sends one request on the control socket and reads the answer.
    func request(_ request: ControlRequest) throws -> ControlResponse {
        guard let received = try exchange(Array(try ControlFraming.encode(request))) else {
            throw HarnessError("control socket closed without an answer")
        }
        return try ControlFraming.decode(ControlResponse.self, from: Data(received.prefix { $0 != 0x0a }))
    }

    func status() throws -> [ServiceStatus] {
        let response = try request(ControlRequest(command: .status))
        guard response.ok, let services = response.services else {
            throw HarnessError("status failed: \(response.error ?? "?")")
        }
        return services
    }

    /// Waits until the daemon answers and `condition` holds for its status.
    @discardableResult
    func waitFor(_ what: String, timeoutMs: Int = 30_000, _ condition: ([ServiceStatus]) -> Bool) throws
        -> [ServiceStatus]
    {
        let deadline = nowMs() + Double(timeoutMs)
        var last = "no answer"
        while nowMs() < deadline {
            if let status = checkExited() {
                throw HarnessError("reuseportd exited with status \(status) while waiting for \(what); log:\n\(log)")
            }
            do {
                let services = try status()
                if condition(services) { return services }
                last = "\(services)"
            } catch {
                last = "\(error)"
            }
            sleepMs(20)
        }
        throw HarnessError("timed out after \(timeoutMs) ms waiting for \(what); last: \(last); log:\n\(log)")
    }

    /// Waits until every slot of every service has a worker in state `state`.
    @discardableResult
    func waitForWorkers(_ state: String = "running", timeoutMs: Int = 30_000) throws -> [ServiceStatus] {
        try waitFor("every worker \(state)", timeoutMs: timeoutMs) { services in
            services.allSatisfy { $0.slots.allSatisfy { $0.state == state && $0.pid != nil } }
        }
    }

    func signal(_ signal: Int32) { kill(pid, signal) }

    /// The exit status once the daemon has exited (reaping it).
    func checkExited() -> Int32? {
        if exitStatus == nil { exitStatus = waitExit(pid, timeoutMs: 0) }
        return exitStatus
    }

    func waitForExit(timeoutMs: Int) -> Int32? {
        if exitStatus == nil { exitStatus = waitExit(pid, timeoutMs: timeoutMs) }
        return exitStatus
    }

    /// Kills what is left (the workers die with the daemon: PR_SET_PDEATHSIG) and removes
    /// any pins a killed daemon could not.
    deinit {
        if checkExited() == nil {
            kill(pid, SIGKILL)
            _ = waitExit(pid, timeoutMs: 5000)
        }
        for service in PinLayout.services(under: pinRoot) { PinLayout(root: pinRoot, service: service).remove() }
        rmdir(pinRoot)
    }
}

/// A whoami answer: `slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>\n<payload>`.
struct WhoamiReply: Equatable {
    var slot: UInt32
    var pid: Int32
    var service: String
    var peer: String
    var payload: [UInt8]

    init?(_ bytes: [UInt8]) {
        guard let newline = bytes.firstIndex(of: 0x0a) else { return nil }
        let header = String(decoding: bytes[..<newline], as: UTF8.self)
        var fields: [String: String] = [:]
        for part in header.split(separator: " ") {
            guard let equals = part.firstIndex(of: "=") else { return nil }
            fields[String(part[..<equals])] = String(part[part.index(after: equals)...])
        }
        guard let slot = fields["slot"].flatMap({ UInt32($0) }), let pid = fields["pid"].flatMap({ Int32($0) }),
              let service = fields["service"], let peer = fields["peer"]
        else { return nil }
        self.slot = slot
        self.pid = pid
        self.service = service
        self.peer = peer
        payload = Array(bytes[(newline + 1)...])
    }
}

enum Whoami {
    /// Sends one datagram from each client and returns the whoami answer each got
    /// (asking again, up to 3 times, for clients without an answer).
    static func ask(_ clients: [FlowClient], to destination: SocketAddress) throws -> [WhoamiReply?] {
        var replies = [WhoamiReply?](repeating: nil, count: clients.count)
        for _ in 0..<3 {
            let missing = replies.indices.filter { replies[$0] == nil }
            if missing.isEmpty { break }
            for index in missing { try clients[index].send(Array("probe \(index)".utf8), to: destination) }
            var fds = missing.map { pollfd(fd: clients[$0].fd, events: Int16(POLLIN), revents: 0) }
            let deadline = nowMs() + 2000
            var pending = missing.count
            while pending > 0 && nowMs() < deadline {
                if poll(&fds, nfds_t(fds.count), 100) <= 0 { continue }
                for (position, index) in missing.enumerated() where fds[position].revents & Int16(POLLIN) != 0 {
                    fds[position].revents = 0
                    while let bytes = try clients[index].receive(timeoutMs: 0) {
                        if replies[index] == nil, let reply = WhoamiReply(bytes) {
                            replies[index] = reply
                            pending -= 1
                            fds[position].events = 0
                        }
                    }
                }
            }
        }
        return replies
    }
}

/// The slot of every bucket, read from the pinned table.
func pinnedBuckets(_ daemon: DaemonUnderTest, service: String) throws -> [UInt32] {
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
