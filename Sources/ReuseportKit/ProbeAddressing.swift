import CReuseportABI

/// How a health probe reaches one particular slot through the shared port: the reverse of
/// `reuseportctl which`. The daemon knows the seed, the bucket table and the flow records, so
/// it picks a source port whose flow the program sends to the slot, and sends from there.
/// Nothing changes on the data path: the probe is a flow like any other (bpf/dispatch.bpf.c is
/// not touched, and costs nothing more per packet).
///
/// Pure: the snapshot and the records are arguments, and the caller binds the port it gets.
public enum ProbeAddressing {
    /// Where a probe sends to, and from which address, for a listener at `listen`: the listen
    /// address itself, or for a wildcard listener the loopback address of its family. Nil when
    /// the address is not one of this host's (`isLocal` false): no source here can reach it.
    public static func route(to listen: SocketAddress, isLocal: (IPAddress) -> Bool) -> (from: IPAddress, to: SocketAddress)? {
        if listen.address.isWildcard {
            let loopback = listen.address.isV4 ? IPAddress.loopbackV4 : IPAddress.loopbackV6
            return (loopback, SocketAddress(loopback, listen.port))
        }
        guard isLocal(listen.address) else { return nil }
        // A packet from one of the host's own addresses to itself goes over lo, and the
        // program sees exactly these addresses (net/ipv4/route.c: a local destination routes
        // through the loopback device).
        return (listen.address, listen)
    }

    /// The slot the program selects for `flow` (and `payload`, for a service with QUIC
    /// steering): the record's slot in a pinned bucket that has one (`recordSlot`), else the
    /// bucket's slot, or the fallback when that slot has no socket; nil when it drops it.
    public static func landingSlot(of flow: FlowTuple, payload: [UInt8] = [], in snapshot: SteeringSnapshot,
                                   recordSlot: (FlowTuple) -> UInt32? = { _ in nil }) -> UInt32? {
        if flow.transport == .udp {
            switch snapshot.quicPlacement(ofPayload: payload) {
            case .byConnectionID(let slot): return slot
            case .byDCIDHash(let placement): return placement.slot
            case .dropped: return nil
            case .byFlow, .steeringOff: break
            }
        }
        let placement = snapshot.placement(of: flow)
        // Only UDP flows have records (a TCP connection, once accepted, never moves).
        if flow.transport == .udp, let value = snapshot.buckets.indices.contains(Int(placement.bucket))
            ? snapshot.buckets[Int(placement.bucket)] : nil, value & UInt32(RP_BUCKET_PINNED) != 0,
           let recorded = recordSlot(flow), snapshot.liveSlots.contains(recorded)
        {
            return recorded
        }
        return placement.slot
    }

    /// The ports a probe tries, in order, for `slot`: the top of the non-ephemeral range
    /// (ip_local_port_range starts at 32768 by default), from an offset per slot so that two
    /// slots' probes seldom try the same port first.
    public static func candidatePorts(for slot: UInt32) -> [UInt16] {
        let range = Array(UInt16(20_000)..<UInt16(32_768))
        let start = Int(slot &* 2_654_435_761 % UInt32(range.count))
        return Array(range[start...] + range[..<start])
    }

    /// The first source port, of `ports`, from which a probe of `transport` at `from` to `to`
    /// lands on `slot`; nil when none does (the slot has no bucket, or takes only recorded flows).
    /// `usable` is asked for each port that lands there (the caller tries to bind it).
    public static func sourcePort(reaching slot: UInt32, transport: Transport, from source: IPAddress,
                                  to destination: SocketAddress, payload: [UInt8] = [], in snapshot: SteeringSnapshot,
                                  ports: [UInt16], recordSlot: (FlowTuple) -> UInt32? = { _ in nil },
                                  usable: (UInt16) -> Bool = { _ in true }) -> UInt16? {
        ports.first { port in
            let flow = FlowTuple(transport, from: SocketAddress(source, port), to: destination)
            return landingSlot(of: flow, payload: payload, in: snapshot, recordSlot: recordSlot) == slot && usable(port)
        }
    }
}
