import ArgumentParser
import ReuseportKit

/// `flows`: the flow records of placement changes in progress.
struct FlowsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flows",
        abstract: "List the flow records of a placement change in progress: tuple, slot, idle for.",
        discussion: """
            While a change (scale, restore after failover) learns, each UDP flow seen in a bucket \
            that will move is recorded with the slot it went to; after the switch the program sends \
            each recorded flow to that slot until the record has been idle for flow_idle_timeout_ms. \
            Outside a change there are no records. Read from the pinned maps: works while the daemon \
            is wedged.

            Examples:
              reuseportctl flows
              reuseportctl flows --service vpn --slot 3
              reuseportctl flows --json
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Option(help: ArgumentHelp("Only records naming this slot.", valueName: "N"))
    var slot: UInt32?

    @Flag(help: "Print JSON: one object per service with its records.")
    var json = false

    struct Listing: Encodable {
        var service: String
        var records: [Record]
    }

    struct Record: Encodable {
        var transport: String
        var source: String
        var destination: String
        var slot: UInt32
        var packets: UInt32
        var idleSeconds: Double
    }

    func run() throws {
        let reader = ServiceReader(root: location.pinDirectory)
        let now = UInt64(MonotonicClock.nanoseconds())
        var listings: [Listing] = []
        for name in try reader.select(service.service) {
            let maps = try reader.open(name).maps
            let records = try FlowRecords.read(maps)
                .filter { slot == nil || $0.slot == slot }
                .sorted { ($0.slot, $0.lastSeenNs) < ($1.slot, $1.lastSeenNs) }
            listings.append(Listing(service: name, records: records.map {
                Record(transport: $0.flow.transport.rawValue, source: $0.flow.source.description,
                       destination: $0.flow.destination.description, slot: $0.slot, packets: $0.packets,
                       idleSeconds: (Double($0.idleNs(at: now)) / 1e6).rounded() / 1000)
            }))
        }
        if json {
            print(try JSONOutput.string(listings))
            return
        }
        for listing in listings {
            print("\(listing.service): \(listing.records.count) records")
            guard !listing.records.isEmpty else { continue }
            var table = TextTable([("SLOT", .right), ("PROTO", .left), ("SOURCE", .left), ("DESTINATION", .left),
                                   ("PACKETS", .right), ("IDLE", .right)])
            for record in listing.records {
                table.add(["\(record.slot)", record.transport, record.source, record.destination, "\(record.packets)",
                           HumanFormat.duration(record.idleSeconds)])
            }
            print(table.render(indent: "  "), terminator: "")
        }
    }
}
