#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport

/// Pinned maps outlive the process that pinned them: a second process (this program
/// again, `kernel-check reopen-pins`) opens them and sees the same configuration,
/// bucket table and sockets.
enum PinChecks {
    static let all: [Check] = [pinnedMapsReopen]

    static let pinnedMapsReopen = Check(
        "pinned-maps-reopen",
        "maps pinned on bpffs reopen from a second process with the same config, buckets and socket cookies"
    ) { context in
        let plane = try Fixture.service(.udp, on: .loopbackV4, slots: 4)
        let layout = PinLayout(root: TestPinRoot.unique("kernel-check-pins"), service: "pins")
        try plane.pin(layout)
        defer { layout.remove() }
        let expected = try describe(maps: plane.maps, sockets: plane.listeners[0].program.sockets)

        let child = try Subprocess(BuiltProducts.selfPath, ["reopen-pins", layout.root, layout.service])
        guard let status = child.wait(timeoutMs: 30_000) else {
            throw CheckFailure(description: "the second process did not finish in 30 s")
        }
        let lines = child.text.split(separator: "\n").map(String.init)
        try context.expect(status == .exited(0), "the second process failed (\(status)): \(child.text)")
        try context.expect(lines == expected, "the second process sees \(lines.prefix(3)), this one \(expected.prefix(3))")
        return "second process (pid \(child.pid)) read the same config, \(plane.buckets.count) buckets and 4 cookies"
    }

    /// What both processes print and compare: config, bucket table, live slots' cookies.
    static func describe(maps: DispatchMaps, sockets: SocketArray) throws -> [String] {
        try maps.checkConfiguredABI()
        let config = try maps.readConfig()
        let buckets = try maps.readBuckets()
        let cookies = try (0..<config.slot_count).map { try sockets.cookie(at: $0).map(String.init) ?? "-" }
        return [
            "config seed=\(config.seed) buckets=\(config.bucket_count) slots=\(config.slot_count)",
            "buckets " + buckets.map(String.init).joined(separator: ","),
            "cookies " + cookies.joined(separator: ","),
        ]
    }

    /// The second process: `kernel-check reopen-pins ROOT SERVICE`.
    static func reopen(root: String, service: String) throws {
        let layout = PinLayout(root: root, service: service)
        let maps = try DispatchMaps(pinned: layout)
        let sockets = try SocketArray(pinned: layout, listener: 0)
        for line in try describe(maps: maps, sockets: sockets) { Output.line(line) }
    }
}
