#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import ReuseportKit
import ReuseportTestSupport

/// QUIC connection-ID steering: the kernel lets an SK_REUSEPORT program read the UDP payload
/// straight from the packet (ctx->data points at the UDP header; the program reads the QUIC
/// header past it), and the steering program sends QUIC packets where their CID says.
enum QuicChecks {
    static let all: [Check] = [directPacketAccess, steering, beyondTheSlotMaps, garbage]

    /// sk_reuseport_is_valid_access() (net/core/filter.c) gives data and data_end as packet
    /// pointers: a read past the UDP header is accepted after a bounds check against data_end,
    /// and refused without one.
    static let directPacketAccess = Check(
        "quic-direct-packet-access",
        "an SK_REUSEPORT program may read the UDP payload (QUIC header) from ctx->data after a bounds check, not without"
    ) { context in
        let checked = probe(boundsChecked: true)
        let unchecked = probe(boundsChecked: false)
        context.record("bounds_checked", checked == 0 ? "loads" : errnoName(checked))
        context.record("unchecked", unchecked == 0 ? "loads" : errnoName(unchecked))
        try context.expect(checked == 0, "a bounds-checked read of the UDP payload was refused: \(errnoName(checked))")
        try context.expect(unchecked == EACCES, "an unchecked read of the UDP payload gave \(errnoName(unchecked)), "
                               + "expected the verifier's EACCES")
        return "payload octet \(lastOctet) read after the bounds check; refused (EACCES) without it"
    }

    /// The UDP header (8) and the QUIC header the program copies (RP_QUIC_HEADER_BYTES).
    static let lastOctet = 8 + Int(RP_QUIC_HEADER_BYTES) - 1

    /// Loads `r2 = data; r3 = data_end; [if r2 + 34 > r3 goto pass;] r5 = *(u8 *)(r2 + 33);
    /// pass: r0 = SK_PASS; exit`. Returns 0 if the verifier accepts it, else the errno.
    static func probe(boundsChecked: Bool) -> Int32 {
        func insn(_ code: Int32, _ dst: UInt8, _ src: UInt8, _ off: Int16, _ imm: Int32) -> bpf_insn {
            bpf_insn(code: UInt8(code), dst_reg: dst, src_reg: src, off: off, imm: imm)
        }
        var instructions = [
            insn(BPF_LDX | BPF_MEM | BPF_DW, 2, 1, 0, 0),
            insn(BPF_LDX | BPF_MEM | BPF_DW, 3, 1, 8, 0),
        ]
        if boundsChecked {
            instructions += [
                insn(BPF_ALU64 | BPF_MOV | BPF_X, 4, 2, 0, 0),
                insn(BPF_ALU64 | BPF_ADD | BPF_K, 4, 0, 0, Int32(lastOctet + 1)),
                insn(BPF_JMP | BPF_JGT | BPF_X, 4, 3, 1, 0),
            ]
        }
        instructions += [
            insn(BPF_LDX | BPF_MEM | BPF_B, 5, 2, Int16(lastOctet), 0),
            insn(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, Int32(SK_PASS.rawValue)),
            insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
        ]
        let fd = bpf_prog_load(BPF_PROG_TYPE_SK_REUSEPORT, "rp_quic_probe", "GPL", instructions, instructions.count, nil)
        if fd < 0 { return errno }
        Syscall.close(fd)
        return 0
    }

    static let steering = Check(
        "quic-steering",
        "short headers reach the slot their CID names from any source port; Initials go by DCID, as predicted; "
            + "stale and unknown CIDs fall back by flow, counted"
    ) { context in
        let plane = try QuicScenario.service(slots: 4)
        let migration = try QuicScenario.shortHeadersFollowTheirCID(plane, sources: 16)
        for slot in plane.slots {
            try context.expect(migration.reached[slot] == [slot],
                               "slot \(slot)'s CID reached slots \(migration.reached[slot] ?? [])")
        }
        try context.expect(migration.counters.cid_steered == 64, "cid_steered \(migration.counters.cid_steered), sent 64")
        let handshake = try QuicScenario.initialsFollowTheirDCID(plane, dcids: 32, sources: 4)
        for (dcid, slots) in handshake.reached {
            try context.expect(slots.count == 1 && slots.first == handshake.predicted[dcid],
                               "Initials of DCID \(QuicSteering.hex(dcid)) reached \(slots), predicted "
                                   + "\(handshake.predicted[dcid].map(String.init) ?? "none")")
        }
        try context.expect(handshake.counters.initials == 128, "initials \(handshake.counters.initials), sent 128")
        let fallback = try QuicScenario.staleAndUnknownFallBack(plane, closed: 2, clients: 32)
        try context.expect(fallback.landings.allSatisfy { $0.reached == $0.predicted },
                           "a CID that falls back did not land where the flow hash predicts")
        try context.expect(fallback.counters.fallbacks == 16 && fallback.counters.unknown_cid == 16,
                           "fallbacks \(fallback.counters.fallbacks), unknown_cid \(fallback.counters.unknown_cid)")
        context.record("cid_steered", fallback.counters.cid_steered)
        context.record("dcid_hashed", fallback.counters.dcid_hashed)
        return "64 short headers on their CID's slot, 32 DCIDs' Initials each on one predicted slot, 32 stale/unknown by flow"
    }

    /// The slot-indexed maps are sized from the workers (16 slots for 4), smaller than the slots a
    /// CID can name: the program relies on the kernel bounding each index by the map's size.
    static let beyondTheSlotMaps = Check(
        "quic-cid-beyond-slot-maps",
        "short headers naming a slot past the end of the service's (sized) socket array go by flow, counted as "
            + "fallbacks, with no select error"
    ) { context in
        let plane = try QuicScenario.service(slots: 4)
        let (fallback, selectErrors) = try QuicScenario.beyondTheSlotMaps(plane, clients: 32)
        context.record("slot_capacity", plane.slotCapacity)
        context.record("fallbacks", fallback.counters.fallbacks)
        try context.expect(plane.slotCapacity == 16, "a 4-worker service's maps hold \(plane.slotCapacity) slots, not 16")
        try context.expect(fallback.landings.allSatisfy { $0.reached == $0.predicted },
                           "a CID naming a slot past the array did not land where the flow hash predicts")
        try context.expect(fallback.counters.fallbacks == 32 && fallback.counters.cid_steered == 0,
                           "fallbacks \(fallback.counters.fallbacks), cid_steered \(fallback.counters.cid_steered)")
        try context.expect(selectErrors == 0, "select_errors \(selectErrors)")
        return "32 short headers naming slots 16, 17 and 1023 of a 16-slot array went by flow, as predicted"
    }

    static let garbage = Check(
        "quic-garbage",
        "random datagrams of 0 to 1500 octets reach a slot of the service or are counted dropped, never a foreign socket"
    ) { context in
        let plane = try QuicScenario.service(slots: 4)
        let outcome = try QuicScenario.garbageIn(plane, sources: 32)
        context.record("sent", outcome.sent)
        context.record("delivered", outcome.delivered)
        context.record("counted_dropped", outcome.countedDropped)
        context.record("by_cid", outcome.steeredByCID)
        try context.expect(outcome.toForeign == 0, "\(outcome.toForeign) datagrams reached the foreign socket")
        try context.expect(UInt64(outcome.delivered) + outcome.countedDropped == UInt64(outcome.sent),
                           "\(outcome.delivered) delivered + \(outcome.countedDropped) counted dropped != "
                               + "\(outcome.sent) sent")
        try context.expect(outcome.selectErrors == 0, "select_errors \(outcome.selectErrors)")
        try context.expect(outcome.steeredByCID > 0, "no datagram was steered by its CID")
        return "\(outcome.sent) sent: \(outcome.delivered) delivered, \(outcome.countedDropped) counted dropped, "
            + "0 to the foreign socket"
    }
}
