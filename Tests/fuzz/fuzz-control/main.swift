// The control request decoder's fuzz target (`make fuzz`, docs/fuzzing.md); FuzzDriver runs it.
import Foundation
import FuzzDriver
import ReuseportControl
import ReuseportDaemon

/// The services each decoded request is checked against: none, a sole one (requests may omit
/// the name), and two with a gap in their slots and fewer buckets than the slot limit.
let serviceSets: [[ControlTarget]] = [
    [],
    [ControlTarget(name: "demo", slots: [0, 1, 2, 3], bucketCount: 4096)],
    [
        ControlTarget(name: "dns", slots: [0, 2], bucketCount: 3),
        ControlTarget(name: "web", slots: [], bucketCount: 1),
    ],
]

/// One input, as `ControlServer.read` hands a client's bytes on: the line before the first
/// newline, at most `maximumRequestBytes`. Decoding returns a request or a refusal that
/// starts "bad request:"; a request encodes and decodes back to itself (the CLI's side);
/// checking it against the services returns an action or a refusal.
func fuzzControlRequest(_ bytes: UnsafeRawBufferPointer) {
    let line = Data(bytes.prefix(ControlDefaults.maximumRequestBytes).prefix { $0 != 0x0a })
    let request: ControlRequest
    do {
        request = try ControlFraming.decodeRequest(line)
    } catch {
        guard error.description.hasPrefix("bad request: ") else { fatalError("refusal without its prefix: \(error)") }
        return
    }
    guard let encoded = try? ControlFraming.encode(request),
          let back = try? ControlFraming.decodeRequest(encoded.dropLast()), back == request
    else { fatalError("\(request) does not survive its own encoding") }
    for services in serviceSets {
        guard let action = try? ControlAction(checking: request, against: services) else { continue }
        switch action {
        case .restart(let position, let slot):
            guard services[position].slots.contains(slot) else { fatalError("\(action): no such slot") }
        case .scale(let position, let workers, _, _):
            guard (1...services[position].bucketCount).contains(workers) else { fatalError("\(action): bad count") }
        case .upgrade(let position, _):
            guard services.indices.contains(position) else { fatalError("\(action): no such service") }
        case .canary(let position, let percent, let bakeMs, _):
            guard services.indices.contains(position) else { fatalError("\(action): no such service") }
            guard percent.map({ (1...99).contains($0) }) ?? true, bakeMs.map({ $0 >= 0 }) ?? true else {
                fatalError("\(action): bad canary")
            }
        case .status, .reload, .reexec:
            break
        }
    }
}

runFuzzTarget(fuzzControlRequest)
