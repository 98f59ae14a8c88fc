#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import Foundation
import ReuseportControl
@testable import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// A daemon started on records (bpf/records.h) of another RP_RECORDS_VERSION than its own: a real
/// daemon pins them, is killed with SIGKILL, and its rp_records_version is made to say another
/// version (or removed, as the daemons of version 1 pinned none) before the next daemon starts on
/// the pins. Whoami workers, datagrams on loopback: the workers serve on throughout.
@Suite(.onTestThreads, .serialized) struct RecordsVersionTests {
    static let config = serviceTable("records", workers: 3)

    /// A daemon killed with its workers serving and 64 flows sending every 100 ms.
    static func orphanedWorkers() throws -> (daemon: TestDaemon, layout: PinLayout, pids: [Int32?],
                                             destination: SocketAddress, sessions: Sessions) {
        let daemon = try TestDaemon(config: config)
        let services = try daemon.waitForWorkers()
        let sessions = try Sessions(64, periodMs: 100)
        let destination = try udpEndpoint(services, "records")
        try sessions.run(5, to: destination)
        daemon.signal(SIGKILL)
        #expect(daemon.waitForExit(timeoutMs: 5000) == 128 + SIGKILL)
        return (daemon, PinLayout(root: daemon.pinRoot, service: "records"), services[0].slots.map(\.pid),
                destination, sessions)
    }

    static func writeVersion(_ version: UInt32, at layout: PinLayout) throws {
        let map = try BPFMap(pinnedAt: layout.path(ofShared: RP_MAP_RECORDS_VERSION), name: RP_MAP_RECORDS_VERSION,
                             keySize: 4, valueSize: 4)
        try map.update(0, version)
    }

    /// A newer daemon's records: the daemon refuses them with a message naming both versions and
    /// exits, and never signals the workers they name: every datagram is answered by the same
    /// worker. Once the records say this version again, the next daemon adopts every worker on
    /// its sockets: nothing was lost meanwhile.
    @Test func aNewerDaemonsRecordsAreRefusedAndTheWorkersServeOn() throws {
        let (first, layout, pids, destination, sessions) = try Self.orphanedWorkers()
        let newer = UInt32(RP_RECORDS_VERSION) + 1
        try Self.writeVersion(newer, at: layout)
        let refused = try TestDaemon(config: Self.config, pinRoot: first.pinRoot)
        var status: Int32?
        try sessions.run(20, to: destination) { round in
            if round == 10 { status = refused.waitForExit(timeoutMs: 10_000) }
        }
        let log = refused.log
        print("records version \(newer) met by a daemon of \(RP_RECORDS_VERSION): exit \(status ?? -1), "
            + "\(sessions.lost) datagrams lost, \(sessions.moved.count) flows changed worker")
        #expect(status != nil && status != 0, "the daemon does not start the service: \(refused.logTail(8))")
        #expect(log.contains("records version \(newer) (a newer reuseportd's); this build reads version \(RP_RECORDS_VERSION)"),
                "\(refused.logTail(8))")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
        #expect(pids.compactMap { $0 }.allSatisfy(processExists), "every worker lives on")
        #expect(try ServiceRecords.Version.pinned(at: layout) == newer, "the refused records are left as they were")

        try Self.writeVersion(UInt32(RP_RECORDS_VERSION), at: layout)
        let next = try TestDaemon(config: Self.config, pinRoot: first.pinRoot)
        let adopted = try next.waitForWorkers()[0]
        try sessions.run(5, to: destination)
        #expect(adopted.slots.map(\.pid) == pids && adopted.adoptedWorkers == 3, "\(next.logTail(8))")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
    }

    /// Records of version 1, as the daemons before rp_records_version pinned them (the three maps
    /// in the same layouts, no version map): migrated, every worker adopted with its flows, and
    /// the pins then say this version.
    @Test func version1RecordsAreMigratedAndTheirWorkersAdopted() throws {
        let (first, layout, pids, destination, sessions) = try Self.orphanedWorkers()
        #expect(unlink(layout.path(ofShared: RP_MAP_RECORDS_VERSION)) == 0)
        #expect(try ServiceRecords.Version.pinned(at: layout) == 1)
        let second = try TestDaemon(config: Self.config, pinRoot: first.pinRoot)
        let adopted = try second.waitForWorkers()[0]
        try sessions.run(10, to: destination)
        print("records version 1 met by a daemon of \(RP_RECORDS_VERSION): adopted \(adopted.adoptedWorkers ?? -1), "
            + "\(sessions.lost) datagrams lost, \(sessions.moved.count) flows changed worker")
        #expect(second.log.contains("are of records version 1: migrated to version \(RP_RECORDS_VERSION)"),
                "\(second.logTail(8))")
        #expect(adopted.slots.map(\.pid) == pids && adopted.adoptedWorkers == 3, "\(second.logTail(8))")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
        #expect(try ServiceRecords.Version.pinned(at: layout) == UInt32(RP_RECORDS_VERSION))
    }

    /// The daemon of the previous records version, built from the last commit that wrote it
    /// (`make records-upgrade-test` builds it and names it here; a second build is too slow for
    /// `make test`).
    static let previousDaemon = ProcessInfo.processInfo.environment["REUSEPORT_PREVIOUS_DAEMON"]

    /// The previous records version's daemon runs the workers under 64 flows; its binary is
    /// replaced as a package upgrade does and it reexecs into this build's daemon, which migrates
    /// the records it pinned and adopts every worker: same daemon pid, same workers, every
    /// datagram answered by the same worker, and the pins then say this version.
    @Test(.enabled(if: previousDaemon != nil, "needs REUSEPORT_PREVIOUS_DAEMON: make records-upgrade-test"))
    func reexecFromThePreviousRecordsVersionAdoptsEveryWorker() throws {
        let folder = try TemporaryDirectory("reuseportd-records")
        let binary = "\(folder.path)/reuseportd"
        try FileManager.default.copyItem(atPath: try #require(Self.previousDaemon), toPath: binary)
        let daemon = try TestDaemon(config: Self.config, binary: binary)
        let services = try daemon.waitForWorkers()
        let layout = PinLayout(root: daemon.pinRoot, service: "records")
        let previousVersion = try ServiceRecords.Version.pinned(at: layout)
        #expect(previousVersion == UInt32(RP_RECORDS_VERSION) - 1, "the previous daemon pinned the previous version")
        let destination = try udpEndpoint(services, "records")
        let pids = services[0].slots.map(\.pid)
        let replacement = "\(folder.path)/new"
        try FileManager.default.copyItem(atPath: TestDaemon.builtBinary, toPath: replacement)
        #expect(rename(replacement, binary) == 0)
        let sessions = try Sessions(64, periodMs: 100)
        let status = try reexec(daemon, under: sessions, rounds: 30, at: 10, to: destination)
        print("reexec from records version \(previousVersion) to \(RP_RECORDS_VERSION): \(sessions.lost) datagrams lost, "
            + "\(sessions.moved.count) flows changed worker; adopted \(status.adoptedWorkers ?? -1), "
            + "pids \(pids) → \(status.slots.map(\.pid))")
        #expect(daemon.checkExited() == nil, "the daemon process lives on: \(daemon.logTail(8))")
        #expect(status.slots.map(\.pid) == pids && status.adoptedWorkers == 3, "\(daemon.logTail(8))")
        #expect(sessions.lost == 0 && sessions.moved.isEmpty, "\(sessions.report)")
        #expect(daemon.log.contains("are of records version \(previousVersion): migrated to version \(RP_RECORDS_VERSION)"),
                "\(daemon.logTail(8))")
        #expect(try ServiceRecords.Version.pinned(at: layout) == UInt32(RP_RECORDS_VERSION))
    }
}
