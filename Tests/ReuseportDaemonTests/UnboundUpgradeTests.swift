#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import SystemPackage
import Testing

/// Debian's unbound (package unbound).
let unboundPath = "/usr/sbin/unbound"

/// An unmodified third-party server as the worker: Debian's unbound, which takes its socket by
/// socket activation (`use-systemd: yes`: sd_listen_fds) and says READY=1 by sd_notify. An
/// upgrade from one configuration to another that answers a test name differently, while
/// queries from 128 source ports keep flowing.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"),
       .enabled(if: access(unboundPath, X_OK) == 0, "Debian's unbound is not installed: `make test` installs it"))
struct UnboundUpgradeTests {
    static let unbound = unboundPath

    /// An unbound configuration for 127.0.0.1:`port` whose `test.example.` TXT record is `answer`.
    static func unboundConfig(port: UInt16, answer: String, directory: String) -> String {
        """
        server:
          interface: 127.0.0.1@\(port)
          port: \(port)
          do-ip6: no
          do-tcp: no
          use-systemd: yes
          do-daemonize: no
          username: ""
          chroot: ""
          pidfile: ""
          directory: "\(directory)"
          logfile: ""
          use-syslog: no
          verbosity: 0
          num-threads: 1
          module-config: "iterator"
          local-zone: "example." static
          local-data: "test.example. 60 IN TXT \\"\(answer)\\""
        remote-control:
          control-enable: no

        """
    }

    /// unbound takes sockets by activation only where systemd runs (its systemd_get_activated()
    /// asks sd_booted(), which looks for /run/systemd/system), as on any systemd host. Here PID 1
    /// is not systemd: the daemon runs in a mount namespace of its own whose /run is a tmpfs
    /// holding that folder. Nothing of unbound is changed, and nothing outside the namespace sees it.
    /// The suite's own launcher (REUSEPORT_TEST_LAUNCHER) runs inside it.
    static let systemdHost = ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                              "mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -p /run/systemd/system && exec \"$@\"",
                              "sh"]

    /// A DNS query for `test.example.` TXT with `id`.
    static func query(id: UInt16) -> [UInt8] {
        [UInt8(id >> 8), UInt8(id & 0xff), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
            + [4] + Array("test".utf8) + [7] + Array("example".utf8) + [0] + [0, 16, 0, 1]
    }

    /// The 128 flows: per flow, the ids answered and the answers seen.
    final class Queries {
        let clients: [FlowClient]
        private(set) var answered: [Set<UInt16>]
        private(set) var answers: [Set<String>]
        private(set) var rounds = 0

        init(_ count: Int) throws {
            clients = try Traffic.clients(count, on: .loopbackV4)
            answered = Array(repeating: [], count: count)
            answers = Array(repeating: [], count: count)
        }

        /// One query from every flow, then its answers (at most 3 s).
        func round(to destination: SocketAddress, answerPrefix: String) throws {
            let id = UInt16(truncatingIfNeeded: rounds)
            for client in clients { try client.send(UnboundUpgradeTests.query(id: id), to: destination) }
            rounds += 1
            let deadline = nowMs() + 3000
            var pending = Set(clients.indices)
            while !pending.isEmpty && nowMs() < deadline {
                let ready = try Syscall.poll(pending.map { FileDescriptor(rawValue: clients[$0].fd) }, timeoutMs: 50)
                for index in pending where ready.contains(FileDescriptor(rawValue: clients[index].fd)) {
                    while let bytes = try clients[index].receive(timeoutMs: 0), bytes.count > 2 {
                        answered[index].insert(UInt16(bytes[0]) << 8 | UInt16(bytes[1]))
                        let text = String(decoding: bytes, as: UTF8.self)
                        if let range = text.range(of: answerPrefix + "[a-z]+", options: .regularExpression) {
                            answers[index].insert(String(text[range]))
                        }
                    }
                    if answered[index].contains(id) { pending.remove(index) }
                }
            }
        }

        var lost: Int { answered.reduce(0) { $0 + rounds - $1.count } }
    }

    /// One configuration answers `answer-one`, the next `answer-two`: every query is answered,
    /// every flow live through the upgrade keeps the old answer (its old unbound) until it stops,
    /// new flows get the new one, and the old unbound processes are stopped once idle.
    @Test func unboundUpgradeKeepsEveryFlowsAnswer() throws {
        let folder = try TemporaryDirectory()
        let port = try freePort()
        func config(_ answer: String) throws -> String {
            let path = try folder.write("unbound-\(answer).conf",
                                        Self.unboundConfig(port: port, answer: answer, directory: folder.path))
            return serviceTable("dns", listen: ["udp://127.0.0.1:\(port)"], workers: 4,
                                program: "exec = [\"\(Self.unbound)\", \"-d\", \"-p\", \"-c\", \"\(path)\"]", extra: """
                    notify = true
                    flow_idle_timeout_ms = 1000
                    """)
        }
        let daemon = try TestDaemon(config: try config("answer-one"),
                                    launcher: Self.systemdHost + TestDaemon.defaultLauncher)
        let before = try daemon.waitForWorkers()
        let destination = try udpEndpoint(before, "dns")
        let oldPids = Set(before[0].slots.compactMap(\.pid))
        let live = try Queries(128)
        var switched = false
        var extra = 0
        while !switched || extra < 5 {
            try live.round(to: destination, answerPrefix: "answer-")
            if live.rounds == 3 {
                try daemon.rewriteConfig(try config("answer-two"))
                let response = try daemon.request(ControlRequest(command: .reload))
                #expect(response.ok, "\(response)")
            }
            if switched { extra += 1 } else if live.rounds > 3 {
                switched = try daemon.status()[0].upgrade?.phase == .switched
            }
            guard live.rounds < 100 else { throw HarnessError("no switch; log:\n\(daemon.logTail(30))") }
            usleep(150_000)
        }
        let fresh = try Queries(128)
        try fresh.round(to: destination, answerPrefix: "answer-")
        let liveAnswers = Set(live.answers.flatMap { $0 })
        let freshAnswers = Set(fresh.answers.flatMap { $0 })
        print("unbound upgrade: \(live.rounds) rounds of 128 queries, \(live.lost) unanswered, answers \(liveAnswers.sorted()); "
            + "128 new flows: \(fresh.lost) unanswered, answers \(freshAnswers.sorted())")
        #expect(live.lost == 0, "every query answered")
        #expect(live.answers.allSatisfy { $0 == ["answer-one"] }, "every live flow kept the old answer")
        #expect(fresh.lost == 0 && fresh.answers.allSatisfy { $0 == ["answer-two"] }, "new flows get the new answer")
        let status = try daemon.waitFor("the old unbound slots retired", timeoutMs: 15_000) { services in
            services[0].slots.allSatisfy { $0.generation == 2 }
        }
        #expect(status[0].slots.allSatisfy { $0.notifiedReady == true }, "unbound said READY=1 by itself")
        let gone = nowMs() + 5000
        while oldPids.contains(where: processExists), nowMs() < gone { sleepMs(20) }
        #expect(!oldPids.contains(where: processExists), "the old unbound processes were stopped")
    }
}
