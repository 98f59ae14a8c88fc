#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit
import ReuseportTestSupport
import Synchronization

/// Item 3: SIGKILL each worker in turn under a steady load, kernel default against the
/// real daemon: flows that changed worker, datagrams lost, time to the replacement's
/// first answer.
///
/// Kernel default: each worker process is the only owner of its SO_REUSEPORT socket;
/// when one dies the benchmark, acting as its supervisor, starts a replacement at once on
/// a new socket. reuseportd: the daemon owns the sockets and restarts the worker itself.
/// Both sides run reuseportd's own whoami worker, so the workers are the same code and
/// one client measures both.
struct WorkerDeathBench {
    enum Mode: String, CaseIterable {
        case kernel = "kernel default"
        case reuseportd = "reuseportd"
    }

    struct Kill {
        var slot: Int
        var pid: Int32
        var time: Double
        var movedShare: Double?
        var firstAnswer: Double?
    }

    struct Session {
        var kills: [Kill] = []
        var sent = 0
        var answered = 0
        /// Of the lost, how many the killed worker had most likely read already: sent to its
        /// slot less than 100 ms before the kill. They die with the process, whatever owns
        /// the socket.
        var lostInKilledWorker = 0
        var lost: Int { sent - answered }
    }

    static let workers = 4
    static let flowCount = 256
    static let rate = 5000.0

    var sessions: [Mode: [Session]] = [:]
    var error: String?

    static func run(_ settings: Settings, daemonBinary: String) throws -> WorkerDeathBench {
        var result = WorkerDeathBench()
        guard access(daemonBinary, X_OK) == 0 else {
            result.error = "no reuseportd binary at \(daemonBinary)"
            return result
        }
        let flows = try FlowSet(count: flowCount, address: .loopbackV4)
        let daemon = try DaemonProcess(binary: daemonBinary, workers: workers)
        defer { daemon.stop() }
        let kernel = try KernelDefaultService(binary: daemonBinary, workers: workers)
        defer { kernel.stop() }
        _ = try settledPlacement(flows, daemon, slots: workers)
        let rounds = max(1, settings.deathKills / workers)
        for round in 0..<rounds {
            for mode in interleaved(Mode.allCases, repeat: round) {
                let session = try runSession(mode, flows: flows, daemon: daemon, kernel: kernel,
                                             id: UInt32(round * 2 + (mode == .kernel ? 0 : 1)))
                result.sessions[mode, default: []].append(session)
            }
            Log.note("  worker death: round \(round + 1)/\(rounds) done")
        }
        return result
    }

    func kills(_ mode: Mode) -> [Kill] { sessions[mode]?.flatMap(\.kills) ?? [] }
    func lost(_ mode: Mode) -> Int { sessions[mode]?.map(\.lost).reduce(0, +) ?? 0 }
    func lostInKilledWorker(_ mode: Mode) -> Int { sessions[mode]?.map(\.lostInKilledWorker).reduce(0, +) ?? 0 }
    func sent(_ mode: Mode) -> Int { sessions[mode]?.map(\.sent).reduce(0, +) ?? 0 }

    /// One worker killed per slot, 1.5 s apart, under `rate` datagrams/s from all flows.
    static func runSession(_ mode: Mode, flows: FlowSet, daemon: DaemonProcess, kernel: KernelDefaultService,
                           id: UInt32) throws -> Session
    {
        let destination = mode == .kernel ? kernel.destination : daemon.destination
        let load = WhoamiLoad(flows: flows, destination: destination, session: id)
        let killsDone = StopFlag()
        let kills = Mutex<[Kill]>([])
        var failure: Error?
        let chaos = PinnedThread(cpu: nil) {
            pause(1.0)
            for slot in 0..<workers {
                guard let pid = load.currentPid(ofSlot: slot) else {
                    failure = BenchError("\(mode.rawValue): slot \(slot) never answered")
                    break
                }
                let time = MonotonicClock.seconds()
                try? Syscall.kill(pid, SIGKILL)
                kills.withLock { $0.append(Kill(slot: slot, pid: pid, time: time)) }
                if mode == .kernel {
                    do { try kernel.replace(slot: slot, dead: pid) } catch { failure = error }
                }
                pause(1.5)
            }
            killsDone.raise()
        }
        load.run(until: killsDone)
        chaos.join()
        if let failure { throw failure }
        var session = Session(kills: kills.withLock { $0 }, sent: load.sent, answered: load.answeredCount)
        load.analyse(&session.kills)
        session.lostInKilledWorker = load.lostInKilledWorkers(session.kills)
        return session
    }
}

/// Steady whoami traffic from every flow, each datagram numbered, every answer recorded.
final class WhoamiLoad {
    struct Answer {
        var time: Double
        var flow: Int
        var slot: Int
        var pid: Int32
    }

    let flows: FlowSet
    let destination: SocketAddress
    let session: UInt32
    private(set) var sent = 0
    private var answered: [[Bool]]
    private var sendTimes: [[Double]]
    private(set) var answers: [Answer] = []
    private let pids = Mutex<[Int: Int32]>([:])

    init(flows: FlowSet, destination: SocketAddress, session: UInt32) {
        self.flows = flows
        self.destination = destination
        self.session = session
        answered = Array(repeating: [], count: flows.fds.count)
        sendTimes = Array(repeating: [], count: flows.fds.count)
    }

    var answeredCount: Int { answered.map { $0.filter { $0 }.count }.reduce(0, +) }

    /// The pid that last answered for `slot`.
    func currentPid(ofSlot slot: Int) -> Int32? { pids.withLock { $0[slot] } }

    /// Sends at WorkerDeathBench.rate until `stop` is raised and 1 s more (the last
    /// replacement settles), then waits 1 s for late answers.
    func run(until stop: StopFlag) {
        guard let epoll = try? EpollSet(flows.fds) else { return }
        var buffer = [UInt8](repeating: 0, count: 2048)
        let start = MonotonicClock.seconds()
        var stopAt: Double?
        var flow = 0
        while true {
            let t = MonotonicClock.seconds()
            if stopAt == nil && stop.isRaised { stopAt = t + 1.0 }
            if let stopAt, t > stopAt + 1.0 { break }
            if stopAt == nil || t < stopAt! {
                let due = Int((t - start) * WorkerDeathBench.rate)
                while sent < due {
                    var payload: (UInt32, UInt32, UInt32) = (UInt32(flow), UInt32(answered[flow].count), session)
                    let result = destination.withSockaddr { sendto(flows.fds[flow], &payload, 12, 0, $0, $1) }
                    if result == 12 {
                        answered[flow].append(false)
                        sendTimes[flow].append(t)
                        sent += 1
                    }
                    flow = flow + 1 == flows.fds.count ? 0 : flow + 1
                }
            }
            for index in epoll.wait(timeoutMs: 1) {
                while true {
                    let count = buffer.withUnsafeMutableBytes {
                        recv(flows.fds[index], $0.baseAddress, $0.count, rp_bench_MSG_DONTWAIT)
                    }
                    if count <= 0 { break }
                    guard let reply = WhoamiReply(buffer[0..<count]), reply.payload.count >= 12 else { continue }
                    let words = reply.payload.withUnsafeBytes { raw in
                        (raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self),
                         raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self),
                         raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                    }
                    guard words.2 == session, Int(words.0) == index, Int(words.1) < answered[index].count else { continue }
                    answered[index][Int(words.1)] = true
                    answers.append(Answer(time: MonotonicClock.seconds(), flow: index, slot: Int(reply.slot), pid: reply.pid))
                    pids.withLock { $0[Int(reply.slot)] = reply.pid }
                }
            }
        }
    }

    /// Unanswered datagrams sent to a killed worker's slot less than 100 ms before the kill
    /// (the flow's slot taken from its last answer before the kill).
    func lostInKilledWorkers(_ kills: [WorkerDeathBench.Kill]) -> Int {
        var count = 0
        for kill in kills {
            var slotBefore: [Int: Int] = [:]
            for answer in answers where answer.time < kill.time { slotBefore[answer.flow] = answer.slot }
            for flow in answered.indices where slotBefore[flow] == kill.slot {
                for (seq, time) in sendTimes[flow].enumerated()
                where !answered[flow][seq] && time <= kill.time && kill.time - time < 0.1 {
                    count += 1
                }
            }
        }
        return count
    }

    /// Fills in, for each kill, the time to the first answer from a new worker at its slot,
    /// and the share of flows whose slot after the replacement settled (their last answer
    /// before the next kill) differs from their slot before the kill.
    func analyse(_ kills: inout [WorkerDeathBench.Kill]) {
        for index in kills.indices {
            let kill = kills[index]
            let next = index + 1 < kills.count ? kills[index + 1].time : Double.infinity
            kills[index].firstAnswer = answers.first {
                $0.time > kill.time && $0.slot == kill.slot && $0.pid != kill.pid
            }.map { $0.time - kill.time }
            var before: [Int: Int] = [:]
            var after: [Int: Int] = [:]
            for answer in answers {
                if answer.time < kill.time {
                    before[answer.flow] = answer.slot
                } else if answer.time < next {
                    after[answer.flow] = answer.slot
                }
            }
            let both = before.keys.filter { after[$0] != nil }
            if !both.isEmpty {
                kills[index].movedShare = Double(both.filter { before[$0] != after[$0] }.count) / Double(both.count)
            }
        }
    }
}

/// The kernel's default model: N worker processes, each the only owner of its own
/// SO_REUSEPORT socket, replaced by a new process on a new socket when one dies.
///
/// The worker is reuseportd's built-in whoami (`reuseportd worker whoami`), started the
/// systemd way: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID its own pid (set by the shell
/// that execs it). This process closes its copy at once, so the socket dies with the worker.
final class KernelDefaultService {
    let binary: String
    let destination: SocketAddress
    private let pids = Mutex<[Int: pid_t]>([:])

    init(binary: String, workers: Int) throws {
        self.binary = binary
        destination = try freeUDPPort(on: .loopbackV4)
        for slot in 0..<workers { try start(slot: slot) }
    }

    private func start(slot: Int) throws {
        let socket = try ReuseportSocket(endpoint: Endpoint(.udp, destination))
        defer { socket.close() }
        let arguments = ["/bin/sh", "-c", "LISTEN_PID=$$ exec \"$0\" worker whoami", binary]
        let environment = ["LISTEN_FDS=1", "REUSEPORT_SLOT=\(slot)", "REUSEPORT_SERVICE=kernel", "PATH=/usr/bin:/bin"]
        let pid = try ProcessSpawn(
            path: arguments[0], arguments: arguments, environment: environment,
            fileActions: [
                .nullInput, .open(1, path: "/dev/null", flags: O_WRONLY), .duplicate(1, to: 2),
                // dup2 leaves the copy without FD_CLOEXEC: the worker keeps fd 3.
                .duplicate(socket.fd.rawValue, to: 3),
            ]
        ).start()
        pids.withLock { $0[slot] = pid }
    }

    /// Reaps the dead worker of `slot` and starts its replacement on a new socket.
    func replace(slot: Int, dead: pid_t) throws {
        _ = try? Syscall.wait(dead, block: true)
        try start(slot: slot)
    }

    func stop() {
        for pid in pids.withLock({ Array($0.values) }) {
            try? Syscall.kill(pid, SIGKILL)
            _ = try? Syscall.wait(pid, block: true)
        }
        pids.withLock { $0.removeAll() }
    }

    deinit { stop() }
}
