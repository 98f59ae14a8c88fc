import ReuseportControl
import ReuseportDaemon
import Testing

/// The daemon's check of a decoded request against its services (`ControlAction`), without a
/// live daemon: the refusals a client reads.
struct ControlActionTests {
    static let sole = [ControlTarget(name: "demo", slots: [0, 1, 2, 3], bucketCount: 4096)]
    static let pair = [ControlTarget(name: "dns", slots: [0, 2], bucketCount: 3),
                       ControlTarget(name: "web", slots: [], bucketCount: 1)]

    func refusal(_ request: ControlRequest, _ services: [ControlTarget]) -> String? {
        let error = #expect(throws: ControlRequestError.self) {
            try ControlAction(checking: request, against: services)
        }
        return error?.description
    }

    @Test func aSoleServiceNeedsNoName() throws {
        #expect(try ControlAction(checking: .init(command: .restart, slot: 3), against: Self.sole)
            == .restart(service: 0, slot: 3))
        #expect(try ControlAction(checking: .init(command: .scale, workers: 1024), against: Self.sole)
            == .scale(service: 0, workers: 1024, now: false, dryRun: false))
        #expect(try ControlAction(checking: .init(command: .status, service: "x"), against: [])
            == .status(service: "x"))
        #expect(try ControlAction(checking: .init(command: .reload), against: []) == .reload)
    }

    @Test func refusalsNameWhatIsWrong() {
        #expect(refusal(.init(command: .restart, slot: 0), Self.pair) == "name a service: this daemon runs dns, web")
        #expect(refusal(.init(command: .scale, service: "x", workers: 1), Self.pair)
            == "no service named 'x': this daemon runs dns, web")
        #expect(refusal(.init(command: .restart, service: "dns", slot: 1), Self.pair)
            == "service dns has no slot 1: its slots are 0 to 2")
        #expect(refusal(.init(command: .restart, service: "web", slot: UInt32.max), Self.pair)
            == "service web has no slot 4294967295: it has none")
        #expect(refusal(.init(command: .restart, service: "dns"), Self.pair)?.contains("no slot (none given)") == true)
        #expect(refusal(.init(command: .scale, service: "dns", workers: 4), Self.pair)
            == "scale needs a worker count between 1 and 3, got 4")
        #expect(refusal(.init(command: .scale, workers: 0), Self.sole)
            == "scale needs a worker count between 1 and 1024, got 0")
        #expect(refusal(.init(command: .scale, workers: Int.min), Self.sole)?.hasSuffix("got \(Int.min)") == true)
        #expect(refusal(.init(command: .scale), Self.sole)?.hasSuffix("got none") == true)
    }
}
