#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import ReuseportKit
import ReuseportTestSupport

/// Does the kernel load and run the steering program, and does it know every field of
/// `struct sk_reuseport_md` that the program reads?
enum ProgramChecks {
    static let all: [Check] = [loadAndAttach, verifierBudget, verifierRefusal, contextFields, recordClock]

    /// Flow records are stamped with bpf_ktime_get_coarse_ns() where the kernel has it (5.11) and
    /// with bpf_ktime_get_ns() elsewhere, the program's constant chosen at load: on 5.10 the
    /// program with the coarse call compiled in (dead there) must load too. A record made while
    /// the check reads the clock on both sides of its packet carries a reading of the clock the
    /// probe chose: between the two coarse readings, or between the two fine ones.
    static let recordClock = Check(
        "record-clock",
        "flow records carry the coarse clock where the kernel has it (5.11), the fine one elsewhere"
    ) { context in
        let plane = try Fixture.service(.udp, on: .loopbackV4, slots: 2)
        try plane.beginResize(to: 4, now: MonotonicClock.nanoseconds(), learnNs: 3_600_000_000_000)
        let coarse = CoarseClock.isSupported
        context.record("coarse_clock", coarse ? 1 : 0)
        let clients = try Traffic.clients(64, on: .loopbackV4)
        let before = coarse ? MonotonicClock.coarseNanoseconds() : MonotonicClock.nanoseconds()
        _ = try Traffic.slotsOf(clients: clients, sending: plane.listeners[0].endpoint.address,
                                sockets: plane.listeners[0].sockets)
        let after = coarse ? MonotonicClock.coarseNanoseconds() : MonotonicClock.nanoseconds()
        let records = try FlowRecords.read(plane.maps)
        try context.expect(!records.isEmpty, "no flow of a learning bucket was recorded")
        let outside = records.filter { $0.lastSeenNs < UInt64(before) || $0.lastSeenNs > UInt64(after) }
        try context.expect(outside.isEmpty, "\(outside.count) of \(records.count) records stamped outside "
            + "[\(before), \(after)] of the \(coarse ? "coarse" : "fine") clock")
        return "\(records.count) records stamped by the \(coarse ? "coarse clock (bpf_ktime_get_coarse_ns)" : "fine clock (bpf_ktime_get_ns)")"
    }

    static let loadAndAttach = Check(
        "program-load-attach",
        "the steering program passes the verifier, attaches to a UDP group and runs (counters move)"
    ) { context in
        let plane = try Fixture.service(.udp, on: .loopbackV4, slots: 2)
        let program = plane.listeners[0].program
        var info = bpf_prog_info()
        var length = UInt32(MemoryLayout<bpf_prog_info>.size)
        if bpf_obj_get_info_by_fd(program.programFD, &info, &length) != 0 {
            throw ReuseportError.system(call: "bpf_obj_get_info_by_fd(\(RP_PROG_DISPATCH))", errno: errno, hint: nil)
        }
        context.record("xlated_insns", info.xlated_prog_len / 8)
        context.record("jited_bytes", info.jited_prog_len)

        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let payload = [UInt8](repeating: 0x42, count: 100)
        try client.send(payload, to: plane.listeners[0].endpoint.address)
        let got = try Traffic.receive(from: plane.listeners[0].sockets, expected: 1)
        try context.expect(got.count == 1, "the datagram did not arrive")
        let counters = try (0..<UInt32(2)).map { try plane.maps.slotCounters($0) }
        let global = try plane.maps.globalCounters()
        try context.expect(counters.map(\.packets).reduce(0, +) == 1,
                           "the program did not count the datagram: is it attached?")
        // ctx->len counts the UDP header too: the program subtracts it.
        try context.expect(counters.map(\.bytes).reduce(0, +) == 100,
                           "payload bytes counted: \(counters.map(\.bytes).reduce(0, +)), sent 100 (ctx->len)")
        try context.expect(global.unparsable == 0 && global.dropped_no_slot == 0,
                           "unparsable \(global.unparsable), dropped \(global.dropped_no_slot)")
        return "loaded (\(info.xlated_prog_len / 8) insns), attached, 1 datagram steered and counted"
    }

    static let verifierBudget = Check(
        "verifier-budget",
        "the verifier processes at most \(VerifierScenario.dispatchBudget) instructions for the steering program"
    ) { context in
        let processed = try VerifierScenario.dispatchWithinBudget()
        context.record("verified_insns", processed)
        // The benchmarks' reference programs, for scale (not budgeted).
        for (program, report) in try VerifierScenario.baselineReports().sorted(by: { $0.key < $1.key }) {
            context.record("\(program).verified_insns", report.processedInstructions.map(String.init) ?? "?")
        }
        return "\(processed) instructions processed (budget \(VerifierScenario.dispatchBudget), kernel limit 1000000)"
    }

    static let verifierRefusal = Check(
        "verifier-refusal",
        "a program the verifier refuses as too large is reported with the verifier's verdict, not a map hint"
    ) { _ in
        let text = try VerifierScenario.refusalNamesTheVerdict()
        return "refused: \(text.split(separator: ";").first ?? "")"
    }

    /// The fields of `struct sk_reuseport_md` (include/uapi/linux/bpf.h) with their offsets
    /// and load sizes; the kernel checks each access in sk_reuseport_is_valid_access()
    /// (net/core/filter.c) against the struct it was built with, so a field it does not
    /// know is refused at load time. Pointers are 8-byte loads, the rest 4.
    static let fields: [(name: String, offset: Int16, size: Int32, usedByProgram: Bool)] = [
        ("data", 0, BPF_DW, true),
        ("data_end", 8, BPF_DW, true),
        ("len", 16, BPF_W, true),
        ("eth_protocol", 20, BPF_W, true),
        ("ip_protocol", 24, BPF_W, true),
        ("bind_inany", 28, BPF_W, false),
        ("hash", 32, BPF_W, false),
        ("sk", 40, BPF_DW, false),
        ("migrating_sk", 48, BPF_DW, false),
    ]

    static let contextFields = Check(
        "context-fields",
        "every sk_reuseport_md field the program reads is accepted by the verifier (others are recorded)"
    ) { context in
        var missing: [String] = []
        var available: [String] = []
        for field in fields {
            let code = probeLoad(offset: field.offset, size: field.size)
            context.record(field.name, code == 0 ? "yes" : "no(\(errnoName(code)))")
            if code == 0 {
                available.append(field.name)
            } else if field.usedByProgram {
                missing.append("\(field.name): \(errnoName(code))")
            }
        }
        try context.expect(missing.isEmpty, "fields the program reads are refused: \(missing.joined(separator: ", "))")
        return "all 5 used fields load; available: \(available.joined(separator: ","))"
    }

    /// Loads `r2 = *(size *)(ctx + offset); r0 = SK_PASS; exit` as an SK_REUSEPORT program.
    /// Returns 0 if the verifier accepts it, else the errno.
    static func probeLoad(offset: Int16, size: Int32) -> Int32 {
        let instructions = [
            bpf_insn(code: UInt8(BPF_LDX | BPF_MEM | size), dst_reg: 2, src_reg: 1, off: offset, imm: 0),
            bpf_insn(code: UInt8(BPF_ALU64 | BPF_MOV | BPF_K), dst_reg: 0, src_reg: 0, off: 0,
                     imm: Int32(SK_PASS.rawValue)),
            bpf_insn(code: UInt8(BPF_JMP | BPF_EXIT), dst_reg: 0, src_reg: 0, off: 0, imm: 0),
        ]
        let fd = bpf_prog_load(BPF_PROG_TYPE_SK_REUSEPORT, "rp_probe", "GPL", instructions, instructions.count, nil)
        if fd < 0 { return errno }
        Syscall.close(fd)
        return 0
    }
}

/// "EINVAL", "ENOENT", ... for the errno values these checks meet; the number otherwise.
func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINVAL: "EINVAL", EBUSY: "EBUSY", EACCES: "EACCES",
        E2BIG: "E2BIG", ENOMEM: "ENOMEM", EEXIST: "EEXIST", EOPNOTSUPP: "EOPNOTSUPP", EISCONN: "EISCONN",
        EAFNOSUPPORT: "EAFNOSUPPORT", EBADF: "EBADF",
    ]
    return names[code] ?? "errno \(code)"
}
