#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
@testable import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The daemon's records (bpf/records.h) are versioned apart from the program: what a daemon does
/// with records of each version (pure), and that the program's object no longer holds them while
/// a data plane still has them, made by the daemon and pinned with their version.
@Suite(.onTestThreads) struct ServiceRecordsTests {
    typealias Version = ServiceRecords.Version

    @Test func recordsOfThisVersionAreTakenOverAsTheyAre() {
        #expect(Version(found: UInt32(RP_RECORDS_VERSION)) == .current)
        #expect(throws: Never.self) { try Version(found: UInt32(RP_RECORDS_VERSION)).check(at: PinLayout(root: "/x", service: "s")) }
    }

    /// Version 1 (the three maps in the object, no rp_records_version) and version 2 (no canary
    /// records) are migrated, not refused.
    @Test(arguments: [UInt32(1), 2])
    func earlierVersionsAreMigrated(found: UInt32) throws {
        #expect(RP_RECORDS_VERSION == 3)
        #expect(Version(found: found) == .migrate(from: found))
        try Version(found: found).check(at: PinLayout(root: "/x", service: "s"))
    }

    /// A newer daemon's records, and a version no daemon wrote (0), are refused, and the refusal
    /// names both versions and the folder.
    @Test(arguments: [UInt32(RP_RECORDS_VERSION) + 1, 0, 77])
    func recordsOfAnUnknownVersionAreRefused(found: UInt32) throws {
        let version = Version(found: found)
        #expect(version == .refuse(found: found))
        let layout = PinLayout(root: "/sys/fs/bpf/rp", service: "dns")
        let error = ReuseportError.recordsVersion(directory: layout.serviceDirectory, found: found)
        #expect(throws: error) { try version.check(at: layout) }
        let refusal = error.description
        #expect(refusal.contains("records version \(found)") && refusal.contains("reads version \(RP_RECORDS_VERSION)"))
        #expect(refusal.contains("/sys/fs/bpf/rp/dns"), "\(refusal)")
        #expect(refusal.contains("newer") == (found > UInt32(RP_RECORDS_VERSION)), "\(refusal)")
    }

    /// A later daemon migrates only the versions it knows a way from: one that skipped a version
    /// without a migration refuses it rather than read it in the wrong layout.
    @Test func aLaterDaemonMigratesOnlyWhatItKnows() {
        #expect(Version(found: 1, current: 4) == .migrate(from: 1))
        #expect(Version(found: 3, current: 5) == .refuse(found: 3))
        #expect(Version(found: 3, current: 3) == .current)
        #expect(Version(found: 1, current: 1) == .current && Version(found: 2, current: 1) == .refuse(found: 2))
    }

    /// The object has none of the records' maps (a change of them changes no RP_ABI_VERSION); a
    /// data plane has them all the same, as the daemon's ARRAY maps of the service's sizes, and
    /// pins them under their old names with rp_records_version. Removing the pins removes it too.
    @Test func theRecordsAreTheDaemonsNotTheObjects() throws {
        let object = try EmbeddedObject(rp_dispatch_object(), count: rp_dispatch_object_size(), name: "dispatch.bpf.o")
        for name in ServiceRecords.names {
            #expect(throws: ReuseportError.invalidArgument("embedded BPF object dispatch.bpf.o has no map \(name)")) {
                _ = try object.map(name)
            }
        }
        let plane = try ServiceDataPlane(endpoints: [Endpoint(.udp, SocketAddress(.loopbackV4, 0))], slotCount: 2,
                                         options: .init(bucketCount: 64))
        defer { plane.close() }
        let layout = PinLayout(root: TestPinRoot.unique("records"), service: "records")
        try plane.pin(layout)
        defer { layout.remove() }
        var row = rp_slot_state()
        row.pid = 42
        row.state = RP_WORKER_RUNNING.rawValue
        try plane.publish(row, slot: 1)
        let records = try ServiceRecords(pinned: layout)
        #expect(records.slotState.type == BPF_MAP_TYPE_ARRAY.rawValue && records.slotState.maxEntries == UInt32(SlotCapacity.sized(workers: 2).value))
        #expect(records.transition.maxEntries == 1 && records.nextBuckets.maxEntries == 64)
        #expect(try records.slotState.lookup(1, as: rp_slot_state.self)?.pid == 42, "the pins are the plane's records")
        #expect(try Version.pinned(at: layout) == UInt32(RP_RECORDS_VERSION))
        layout.remove()
        #expect(!layout.exists)
    }
}
