#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import CReuseportABI

/// Whether an SK_REUSEPORT program may read the coarse monotonic clock
/// (bpf_ktime_get_coarse_ns(), Linux 5.11: CLOCK_MONOTONIC_COARSE, updated once a tick). The
/// steering program stamps flow records with it where it exists: on every packet of a pinned
/// flow it costs less than bpf_ktime_get_ns() (bench item 7), and a tick of lag is nothing
/// against an idle timeout of 100 ms or more. Elsewhere (5.10) the program reads
/// bpf_ktime_get_ns() as before (`RP_CONST_COARSE_CLOCK` in bpf/dispatch.bpf.c).
public enum CoarseClock {
    /// Probed once per process (libbpf_probe_bpf_helper loads a program that calls it).
    public static let isSupported: Bool =
        libbpf_probe_bpf_helper(BPF_PROG_TYPE_SK_REUSEPORT, BPF_FUNC_ktime_get_coarse_ns, nil) == 1
}
