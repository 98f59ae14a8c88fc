#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// Whether the kernel lets an SK_REUSEPORT program choose where a closing TCP listener's
/// pending connections go (expected attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, Linux 5.14,
/// net/core/sock_reuseport.c, reuseport_migrate_sock()). With it, a slot that leaves can close
/// its listener with handshakes still in flight and lose none; without it (5.10 to 5.13) those
/// are reset, so the daemon closes a leaving listener only once its accept queue stayed empty.
public enum ReuseportMigration {
    /// Probed once per process: loads a three-instruction program of that attach type that reads
    /// ctx->migrating_sk (bpf/… rp_migrate_probe_instructions in CReuseportABI.h).
    public static let isSupported: Bool = probe()

    static func probe() -> Bool {
        var instructions = [bpf_insn(), bpf_insn(), bpf_insn()]
        instructions.withUnsafeMutableBufferPointer { rp_migrate_probe_instructions($0.baseAddress!) }
        var options = zeroedOptions(bpf_prog_load_opts())
        options.sz = MemoryLayout<bpf_prog_load_opts>.size
        options.expected_attach_type = BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
        let fd = bpf_prog_load(BPF_PROG_TYPE_SK_REUSEPORT, "rp_probe", "Dual BSD/GPL", instructions,
                               instructions.count, &options)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }
}
