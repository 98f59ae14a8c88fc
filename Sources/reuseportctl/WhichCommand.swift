import ArgumentParser
import ReuseportControl
import ReuseportKit

/// The transports a listener can have, as an argument.
enum TransportChoice: String, CaseIterable, ExpressibleByArgument {
    case udp, tcp

    var transport: Transport { self == .udp ? .udp : .tcp }
}

/// `which`: where the program sends a client, from the same hash and tables.
struct WhichCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "which",
        abstract: "Which slot and worker a client at ADDR:PORT lands on.",
        discussion: """
            Computes the flow hash of bpf/dispatch.h in user space with the pinned seed, bucket \
            table and live slots, exactly as the program does: bucket = hash % buckets, slot = \
            bucket table[bucket]; if that slot has no socket, the same probe the program makes \
            picks a live one (a fallback).

            The hash covers the destination address too. By default it is the service's listen \
            address; a service bound to a wildcard address (0.0.0.0 or ::) needs --to with the \
            address clients send to.

            With --quic-dcid HEX (a service with [service.quic], docs/quic.md): where QUIC packets \
            carrying that destination connection ID go, as the program decides it: a short header \
            to the slot its server ID names while that slot has a socket, else by the flow (give \
            the client's ADDR:PORT to see where); a long header (Initial) the same way, else by \
            the hash of its DCID.

            Examples:
              reuseportctl which 198.51.100.7:40000
              reuseportctl which '[2001:db8::7]:40000' --proto tcp --service web
              reuseportctl which 198.51.100.7:40000 --to 192.0.2.1:53
              reuseportctl which --quic-dcid 2a0003a1b2c3d4e5f60718
            """
    )

    @OptionGroup(title: "Locations") var location: LocationOptions
    @OptionGroup var service: ServiceOption

    @Argument(help: ArgumentHelp("The client's address and port (IPv6 in brackets); several may be given.",
                                 valueName: "ADDR:PORT"))
    var clients: [String] = []

    @Option(name: .customLong("proto"), help: "The transport of the flow (default: the service's only one).")
    var transport: TransportChoice?

    @Option(name: .customLong("to"),
            help: ArgumentHelp("The address and port the client sends to (default: the listen address).",
                               valueName: "ADDR:PORT"))
    var destination: String?

    @Option(name: .customLong("quic-dcid"),
            help: ArgumentHelp("A QUIC destination connection ID in hex: where its packets go.", valueName: "HEX"))
    var quicDCID: String?

    @Flag(help: "Print JSON (schema: cli.md in /usr/share/doc/reuseportd).")
    var json = false

    func validate() throws {
        if let quicDCID {
            guard let octets = QuicSteering.octets(hex: quicDCID),
                  (1...QuicSteering.cidLengthRange.upperBound).contains(octets.count)
            else {
                throw ValidationError("--quic-dcid: '\(quicDCID)' is not 1 to 20 octets of hex, e.g. 2a0003a1b2c3d4e5f60718")
            }
        }
        guard !clients.isEmpty || quicDCID != nil else {
            throw ValidationError("give the client's ADDR:PORT, e.g. 198.51.100.7:40000")
        }
        for client in clients { _ = try parsed(client, "ADDR:PORT") }
        if let destination { _ = try parsed(destination, "--to") }
    }

    private func parsed(_ text: String, _ what: String) throws -> SocketAddress {
        do {
            return try SocketAddress(parsing: text)
        } catch {
            throw ValidationError("\(what): \(error)")
        }
    }

    func run() throws {
        let reader = ServiceReader(root: location.pinDirectory)
        let name = try reader.selectOne(service.service)
        guard var snapshot = try reader.read([name]).first else { return }
        if snapshot.listeners.allSatisfy({ $0.endpoint == nil }) { learnEndpointsFromDaemon(&snapshot) }
        guard snapshot.config.abi_version != 0 else {
            throw CtlError.unanswerable("service '\(name)' has no configuration written yet: the program drops every packet")
        }
        guard BucketCount.range.contains(Int(snapshot.config.bucket_count)) else {
            throw CtlError.unanswerable("service '\(name)' has bucket_count \(snapshot.config.bucket_count) in its configuration,"
                                    + " outside \(BucketCount.range): the program drops every packet")
        }
        let to = try destination.map { try parsed($0, "--to") }
        if let quicDCID { return try answerQuic(snapshot, dcid: QuicSteering.octets(hex: quicDCID)!, to: to) }
        let maps = try reader.open(name).maps
        var answers: [WhichAnswer] = []
        for client in clients {
            let clientAddress = try parsed(client, "ADDR:PORT")
            let (listener, destination) = try route(snapshot, client: clientAddress, to: to)
            let flow = FlowTuple(listener.transport, from: clientAddress, to: destination)
            let placement = snapshot.steering(listener: listener.index).placement(of: flow)
            var answer = WhichAnswer(snapshot: snapshot, listener: listener.index, endpoint: listener.endpoint,
                                     flow: flow, placement: placement)
            try answer.applyRecord(of: flow, maps: maps, snapshot: snapshot)
            answers.append(answer)
        }
        if json {
            print(try JSONOutput.string(answers))
        } else {
            print(answers.map(\.text).joined(separator: "\n"), terminator: "")
        }
    }

    /// `--quic-dcid`: the short and the long header carrying the DCID, through the UDP listener's
    /// program (SteeringSnapshot.quicPlacement mirrors quic_dispatch()).
    private func answerQuic(_ snapshot: ServiceSnapshot, dcid: [UInt8], to: SocketAddress?) throws {
        let udp = snapshot.listeners.first { $0.endpoint?.transport != .tcp } ?? snapshot.listeners.first
        guard let udp else { throw CtlError.unanswerable("service '\(snapshot.name)' has no listener pinned") }
        let steering = snapshot.steering(listener: udp.index)
        guard steering.quic != nil else {
            throw CtlError.unanswerable("service '\(snapshot.name)' does not steer QUIC by connection ID (no "
                                    + "[service.quic]): its datagrams go by flow; ask with the client's ADDR:PORT")
        }
        var flows: [(client: String, placement: Placement)] = []
        for client in clients {
            let address = try parsed(client, "ADDR:PORT")
            let (listener, destination) = try route(snapshot, client: address, to: to)
            flows.append((address.description,
                          snapshot.steering(listener: listener.index).placement(of: FlowTuple(.udp, from: address,
                                                                                               to: destination))))
        }
        let answer = QuicWhichAnswer(snapshot: snapshot, listener: udp.index, dcid: dcid,
                                     short: steering.quicPlacement(ofPayload: QuicHeader.short(dcid: dcid)),
                                     initial: steering.quicPlacement(ofPayload: QuicHeader.initial(dcid: dcid)),
                                     flows: flows)
        if json {
            print(try JSONOutput.string(answer))
        } else {
            print(answer.text, terminator: "")
        }
    }

    /// When the kernel could not say where the listeners are (no sock_diag, or no socket in an
    /// array), the daemon can, if it answers: its status lists them in listener order.
    private func learnEndpointsFromDaemon(_ snapshot: inout ServiceSnapshot) {
        let client = ControlClient(socketPath: location.controlSocket, timeoutSeconds: 2)
        guard let status = try? client.perform(ControlRequest(command: .status, service: snapshot.name)),
              let listeners = status.services?.first(where: { $0.name == snapshot.name })?.listeners
        else { return }
        for index in snapshot.listeners.indices where snapshot.listeners[index].index < listeners.count {
            snapshot.listeners[index].endpoint = try? Endpoint(parsing: listeners[snapshot.listeners[index].index])
        }
    }

    /// The listener the flow arrives on and the destination it hashes.
    private func route(_ snapshot: ServiceSnapshot, client: SocketAddress, to: SocketAddress?) throws
        -> (listener: (index: Int, transport: Transport, endpoint: Endpoint), destination: SocketAddress)
    {
        let known = snapshot.listeners.compactMap { listener in listener.endpoint.map { (listener.index, $0) } }
        let dualStack = Set(snapshot.listeners.filter { $0.dualStack == true }.map(\.index))
        guard !known.isEmpty else {
            throw CtlError.unanswerable("cannot tell where service '\(snapshot.name)' listens: no listener has a socket"
                                    + " in its array\(snapshot.diagnosticsProblem.map { " (\($0))" } ?? "")")
        }
        let clientV4 = client.address.unmapped.isV4
        // An IPv4 client reaches an IPv6 wildcard socket too, as an IPv4 packet, if the socket is
        // dual-stack (IPV6_V6ONLY off): the daemon's are not, a ServiceDataPlane's may be.
        func accepts(_ listener: (index: Int, endpoint: Endpoint)) -> Bool {
            let listenV4 = listener.endpoint.address.address.isV4
            return listenV4 == clientV4
                || (!listenV4 && clientV4 && listener.endpoint.address.address.isWildcard
                    && dualStack.contains(listener.index))
        }
        var candidates = known.filter { transport == nil || $0.1.transport == transport!.transport }
        guard !candidates.isEmpty else {
            throw CtlError.unanswerable("service '\(snapshot.name)' has no \(transport!.rawValue) listener; it listens on "
                                    + known.map { "\($0.1)" }.joined(separator: ", "))
        }
        candidates = candidates.filter { accepts(($0.0, $0.1)) }
        guard !candidates.isEmpty else {
            throw CtlError.unanswerable("no listener of service '\(snapshot.name)' takes IPv\(clientV4 ? 4 : 6) clients;"
                                    + " it listens on " + known.map { "\($0.1)" }.joined(separator: ", "))
        }
        if Set(candidates.map(\.1.transport)).count > 1 {
            throw CtlError.unanswerable("service '\(snapshot.name)' listens on both udp and tcp ("
                                    + candidates.map { "\($0.1)" }.joined(separator: ", ") + "): choose with --proto")
        }
        // Prefer the listener of the client's own family over a dual-stack one.
        let chosen = candidates.first { $0.1.address.address.isV4 == clientV4 } ?? candidates[0]
        let endpoint = chosen.1
        let listen = endpoint.address
        let destination: SocketAddress
        if let to {
            guard to.port == listen.port else {
                throw CtlError.unanswerable("--to \(to): service '\(snapshot.name)' listens on port \(listen.port) (\(endpoint))")
            }
            guard listen.address.isWildcard || to.address.unmapped == listen.address.unmapped else {
                throw CtlError.unanswerable("--to \(to): service '\(snapshot.name)' listens on \(endpoint) only")
            }
            guard to.address.unmapped.isV4 == clientV4 else {
                throw CtlError.unanswerable("--to \(to) and the client \(client) are not of the same IP version")
            }
            destination = to
        } else {
            guard !listen.address.isWildcard else {
                throw CtlError.unanswerable("service '\(snapshot.name)' listens on the wildcard address (\(endpoint)),"
                                        + " and the flow hash covers the destination address:"
                                        + " give the address clients send to with --to ADDR:\(listen.port)")
            }
            destination = listen
        }
        return ((chosen.0, endpoint.transport, endpoint), destination)
    }
}

/// The answer of `which`, for both views.
struct WhichAnswer: Encodable {
    var service: String
    var listener: Int
    var endpoint: String
    var transport: String
    var client: String
    var destination: String
    var seed: UInt32
    var hash: UInt32
    var bucket: UInt32
    var bucketCount: Int
    var bucketSlot: UInt32
    @Nullable var slot: UInt32?
    var fallback: Bool
    @Nullable var pid: UInt32?
    @Nullable var state: String?
    /// The generation of the slot's worker, and whether it is the working one (else it drains, or
    /// starts and takes no flow yet).
    @Nullable var generation: UInt32?
    @Nullable var generationRole: String?
    @Nullable var cookie: UInt64?
    /// The flow has a record (a placement change is in progress) and its bucket is learning or
    /// pinned: `recordSlot` is where it went when recorded, `pinned` whether it goes there now.
    @Nullable var recordSlot: UInt32?
    @Nullable var recordIdleSeconds: Double?
    var pinned = false

    init(snapshot: ServiceSnapshot, listener: Int, endpoint: Endpoint, flow: FlowTuple, placement: Placement) {
        service = snapshot.name
        self.listener = listener
        self.endpoint = endpoint.description
        transport = flow.transport.rawValue
        client = flow.source.description
        destination = flow.destination.description
        seed = snapshot.config.seed
        hash = placement.hash
        bucket = placement.bucket
        bucketCount = snapshot.buckets.count
        bucketSlot = placement.bucketSlot
        slot = placement.slot
        fallback = placement.isFallback
        cookie = placement.slot.flatMap { slot in
            snapshot.listeners.first { $0.index == listener }?.cookies[slot]
        }
        describeWorker(placement.slot, in: snapshot)
    }

    /// The worker of `slot` (nil: none): pid, state, generation.
    private mutating func describeWorker(_ slot: UInt32?, in snapshot: ServiceSnapshot) {
        let slotInfo = slot.flatMap { slot in snapshot.slots.first { $0.index == slot } }
        pid = slotInfo?.pid
        state = slotInfo.map { "\($0.workerState)" }
        let working = snapshot.transition.working_generation
        generation = slotInfo.map(\.state.generation).flatMap { $0 == 0 ? nil : $0 }
        generationRole = generation.map { $0 == working ? "working" : $0 < working ? "draining" : "starting" }
    }

    /// As the program does: a UDP flow of a bucket with transition flags and a record goes to the
    /// recorded slot while that slot has a socket.
    mutating func applyRecord(of flow: FlowTuple, maps: DispatchMaps, snapshot: ServiceSnapshot) throws {
        guard flow.transport == .udp, let record = try FlowRecords.record(of: flow, in: maps) else { return }
        let flags = (try maps.buckets.lookup(bucket, as: UInt32.self) ?? 0) & UInt32(RP_BUCKET_FLAGS)
        guard flags != 0 else { return }
        recordSlot = record.slot
        recordIdleSeconds = Double(record.idleNs(at: UInt64(MonotonicClock.nanoseconds()))) / 1e9
        let cookies = snapshot.listeners.first { $0.index == listener }?.cookies ?? [:]
        guard flags & UInt32(RP_BUCKET_PINNED) != 0, let socket = cookies[record.slot] else { return }
        pinned = true
        slot = record.slot
        fallback = false
        describeWorker(record.slot, in: snapshot)
        cookie = socket
    }

    var text: String {
        var text = "\(transport) \(client) -> \(destination)  (service \(service), listener \(listener): \(endpoint))\n"
        text += "  hash    \(HumanFormat.hex32(hash))  (seed \(HumanFormat.hex32(seed)))\n"
        text += "  bucket  \(bucket) of \(bucketCount) -> slot \(bucketSlot)"
        guard let slot else {
            text += ", which has no socket\n"
            text += "  slot    none: no slot has a socket, the program drops this flow (dropped_no_slot)\n"
            return text
        }
        if pinned {
            text += "\n  record  slot \(recordSlot ?? 0), idle \(HumanFormat.duration(recordIdleSeconds)): pinned there while a placement change drains\n"
        } else if let recordSlot {
            text += "\n  record  slot \(recordSlot), idle \(HumanFormat.duration(recordIdleSeconds)): learned for the coming switch\n"
        } else {
            text += fallback ? ", which has no socket: falls back\n" : "\n"
        }
        text += "  slot    \(slot)\(fallback ? " (fallback)" : "")\(cookie.map { "  socket cookie \($0)" } ?? "")\n"
        text += "  worker  \(pid.map { "pid \($0)" } ?? "no pid")\(state.map { ", \($0)" } ?? "")"
            + (generation.map { ", generation \($0) (\(generationRole ?? "?"))" } ?? "") + "\n"
        return text
    }
}

/// The answer of `which --quic-dcid`, for both views.
struct QuicWhichAnswer: Encodable {
    struct Destination: Encodable {
        /// "cid" (the slot its server ID names), "dcid_hash", "flow" or "dropped".
        var by: String
        @Nullable var slot: UInt32?
        /// The slot the CID names when that slot has no socket (a short header then goes by flow).
        @Nullable var namedSlot: UInt32?
        @Nullable var hash: UInt32?
        @Nullable var pid: UInt32?
    }

    struct Flow: Encodable {
        var client: String
        @Nullable var slot: UInt32?
        @Nullable var pid: UInt32?
    }

    var service: String
    var listener: Int
    var dcid: String
    var cidLength: Int
    var shortHeader: Destination
    var longHeader: Destination
    /// With client addresses given: where a short header that goes by flow lands for each.
    var flows: [Flow]

    init(snapshot: ServiceSnapshot, listener: Int, dcid: [UInt8], short: QuicPlacement, initial: QuicPlacement,
         flows: [(client: String, placement: Placement)]) {
        func pid(_ slot: UInt32?) -> UInt32? { snapshot.slots.first { $0.index == slot }?.pid }
        func destination(_ placement: QuicPlacement) -> Destination {
            switch placement {
            case .byConnectionID(let slot): Destination(by: "cid", slot: slot, namedSlot: nil, hash: nil, pid: pid(slot))
            case .byDCIDHash(let p): Destination(by: "dcid_hash", slot: p.slot, namedSlot: nil, hash: p.hash, pid: pid(p.slot))
            case .byFlow(let named): Destination(by: "flow", slot: nil, namedSlot: named, hash: nil, pid: nil)
            case .dropped, .steeringOff: Destination(by: "dropped", slot: nil, namedSlot: nil, hash: nil, pid: nil)
            }
        }
        service = snapshot.name
        self.listener = listener
        self.dcid = QuicSteering.hex(dcid)
        cidLength = snapshot.quic?.cidLength ?? 0
        shortHeader = destination(short)
        longHeader = destination(initial)
        self.flows = flows.map { Flow(client: $0.client, slot: $0.placement.slot, pid: pid($0.placement.slot)) }
    }

    var text: String {
        func worker(_ destination: Destination) -> String {
            "slot \(destination.slot.map(String.init) ?? "none")" + (destination.pid.map { " (pid \($0))" } ?? "")
        }
        var text = "quic dcid \(dcid)  (service \(service), listener \(listener), cid_length \(cidLength))\n"
        switch shortHeader.by {
        case "cid":
            text += "  short header  \(worker(shortHeader)): its server ID names it\n"
        case "flow":
            text += "  short header  by flow: " + (shortHeader.namedSlot.map { "its server ID names slot \($0), which has no socket (counted in fallbacks)" }
                ?? "not a connection ID of this service's layout (counted in unknown_cid)") + "\n"
            for flow in flows {
                text += "    from \(flow.client): slot \(flow.slot.map(String.init) ?? "none")"
                    + (flow.pid.map { " (pid \($0))" } ?? "") + "\n"
            }
            if flows.isEmpty { text += "    (give the client's ADDR:PORT to see which slot)\n" }
        default:
            text += "  short header  dropped: too short for a DCID of \(cidLength) octets (counted in unparsable)\n"
        }
        switch longHeader.by {
        case "cid": text += "  long header   \(worker(longHeader)): its server ID names it\n"
        case "dcid_hash":
            text += "  long header   \(worker(longHeader)): by the hash of the DCID, "
                + "\(HumanFormat.hex32(longHeader.hash ?? 0))\n"
        default: text += "  long header   dropped\n"
        }
        return text
    }
}
