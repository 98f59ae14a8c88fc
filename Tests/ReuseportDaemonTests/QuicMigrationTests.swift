#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The Python with aioquic that `make test` installs (`.output/venv`, from PyPI): named by
/// REUSEPORT_TEST_PYTHON when the Makefile runs the tests, else looked for in the build folder.
enum AioquicPython {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let required = getenv("REUSEPORT_TEST_PYTHON") != nil
    static var path: String {
        getenv("REUSEPORT_TEST_PYTHON").map { String(cString: $0) } ?? "\(packageRoot)/.output/venv/bin/python3"
    }
    /// Present, or required (then its absence fails the test instead of skipping it).
    static var usable: Bool { required || access(path, X_OK) == 0 }
    static func script(_ name: String) -> String { "\(packageRoot)/Tests/quic/\(name)" }
}

/// Real QUIC (aioquic) through a NAT that rebinds: the reason QUIC connection-ID steering
/// exists. 4 workers (Tests/quic/worker.py) take their socket by socket activation and issue
/// CIDs that carry their server ID; 64 clients (Tests/quic/clients.py) talk to them through
/// a relay that changes its source port every 200 ms, each for 5 s.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs: needs root"),
       .enabled(if: AioquicPython.usable, "aioquic is not installed: `make test` installs it into .output/venv"))
struct QuicMigrationTests {
    struct Connection: Decodable {
        var client: Int
        var pids: [Int32]
        var answered: Int
        var requests: Int
        var completed: Bool
        var error: String?
    }

    struct Run: Decodable {
        var connections: [Connection]
        var rebinds: Int
        var relay_ports: Int
        var seconds: Double
    }

    struct Outcome {
        var run: Run
        var workers: Set<Int32>
        var quic: rp_quic_stats
        var perSlotByCID: [UInt64]
        var log: String
    }

    /// One run: the daemon with 4 aioquic workers, with or without `[service.quic]`.
    func run(steering: Bool, clients: Int = 64) throws -> Outcome {
        let python = AioquicPython.path
        guard access(python, X_OK) == 0 else {
            throw HarnessError("no Python with aioquic at \(python): `make test` installs it (make .output/venv)")
        }
        let keys = try TemporaryDirectory("reuseportd-quic")
        let certificate = "\(keys.path)/cert.pem", key = "\(keys.path)/key.pem"
        let openssl = try Subprocess.run("/usr/bin/openssl", [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", certificate, "-days", "1", "-subj", "/CN=localhost",
        ], captureStandardError: true)
        try #require(openssl.status.shellStatus == 0, "openssl: \(openssl.errors)")
        let quic = steering ? "quic = { cid_length = 12, server_id_length = 2 }" : ""
        let daemon = try TestDaemon(config: serviceTable(
            "quic", workers: 4,
            program: "exec = [\"\(python)\", \"\(AioquicPython.script("worker.py"))\", \"\(certificate)\", \"\(key)\"]",
            extra: quic))
        defer { daemon.stop() }
        let services = try daemon.waitForWorkers()
        let server = try udpEndpoint(services, "quic")
        // The workers print a line once they serve (aioquic takes a moment to import).
        let deadline = nowMs() + 20_000
        while daemon.log.components(separatedBy: "server id").count - 1 < 4 && nowMs() < deadline { sleepMs(50) }
        let clientRun = try Subprocess.run(python, [
            AioquicPython.script("clients.py"), "127.0.0.1", "\(server.port)", "--clients", "\(clients)",
            "--duration", "5", "--rebind", "0.2",
        ], captureStandardError: true)
        try #require(clientRun.status.shellStatus == 0, "clients.py: \(clientRun.errors)")
        let run = try JSONDecoder().decode(Run.self, from: Data(clientRun.output.utf8))
        let maps = try DispatchMaps(pinned: PinLayout(root: daemon.pinRoot, service: "quic"))
        return Outcome(run: run, workers: Set(try daemon.status()[0].slots.compactMap(\.pid)),
                       quic: try maps.quicCounters(),
                       perSlotByCID: try (0..<UInt32(4)).map { try maps.quicSlotCounters($0).cid_steered },
                       log: daemon.logTail(20))
    }

    /// Every connection completes, answered throughout by the worker that accepted it, although
    /// the relay gave each of them some 25 source ports.
    @Test func connectionsKeepTheirWorkerThroughNATRebinding() throws {
        let outcome = try run(steering: true)
        let run = outcome.run
        print("QUIC through a rebinding NAT, CID steering on: \(run.connections.filter(\.completed).count) of "
              + "\(run.connections.count) completed, \(run.rebinds) rebinds over \(run.relay_ports) relay ports, "
              + "\(outcome.quic.cid_steered) packets steered by CID, \(outcome.quic.initials) Initials")
        #expect(run.connections.count == 64)
        #expect(run.rebinds >= 64 * 10, "the relay rebound every connection many times")
        for connection in run.connections {
            #expect(connection.completed, "client \(connection.client): \(connection.error ?? "") \(outcome.log)")
            #expect(connection.answered >= 10)
            #expect(Set(connection.pids).count == 1, "client \(connection.client) was served by \(Set(connection.pids))")
            #expect(connection.pids.first.map(outcome.workers.contains) == true)
        }
        #expect(Set(run.connections.compactMap(\.pids.first)).count == 4, "64 connections spread over 4 workers")
        // The program steered them: counters read back from the pinned maps.
        #expect(outcome.quic.cid_steered > 64 * 10)
        #expect(outcome.quic.initials >= 64)
        #expect(outcome.quic.unparsable == 0 && outcome.quic.version_negotiation == 0)
        #expect(outcome.perSlotByCID.allSatisfy { $0 > 0 }, "\(outcome.perSlotByCID)")
    }

    /// The same run without `[service.quic]`: after a rebinding, a connection's packets hash to
    /// another worker, which does not know it, and connections are lost.
    @Test func withoutCIDSteeringRebindingLosesConnections() throws {
        let outcome = try run(steering: false)
        let lost = outcome.run.connections.filter { !$0.completed }.count
        print("QUIC through a rebinding NAT, CID steering off: \(lost) of \(outcome.run.connections.count) lost")
        #expect(lost > 0)
        #expect(outcome.quic.cid_steered == 0)
    }
}
