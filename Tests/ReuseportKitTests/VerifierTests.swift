#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportTestSupport
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// What the verifier says of our programs on the running kernel, and what a refusal reports.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"))
struct VerifierTests {
    /// The steering program's verification cost stays inside its budget (VerifierScenario).
    @Test func dispatchIsWithinTheVerifierBudget() throws {
        let processed = try VerifierScenario.dispatchWithinBudget()
        print("\(RP_PROG_DISPATCH): the verifier processed \(processed) instructions")
        #expect(processed > 0 && processed <= VerifierScenario.dispatchBudget)
    }

    /// A program the verifier refuses as too large: the error names the program, the verdict
    /// with the verifier's limit and a log file, never a map hint.
    @Test func aRefusedLoadNamesTheVerifiersVerdict() throws {
        let text = try VerifierScenario.refusalNamesTheVerdict()
        #expect(text.contains("refused program \(VerifierScenario.tooLargeProgram)"))
    }
}

/// Hints are chosen by the call and the errno together.
@Suite(.onTestThreads) struct ErrorHintTests {
    @Test func e2bigIsAMapHintOnlyForMapCalls() {
        let map = ReuseportError.system("bpf_map_lookup_elem(rp_buckets[70000])", E2BIG)
        #expect(map.description.contains("the key is beyond the map's size"))
        let load = ReuseportError.system("bpf_object__load(dispatch.bpf.o)", E2BIG)
        #expect(!load.description.contains("the key is beyond"), "\(load)")
    }

    /// A Unix socket's bind (the control socket) is about its folder, not about ports below 1024.
    @Test func aUnixSocketsBindIsNotAPortHint() {
        let unix = ReuseportError.system("bind(/run/reuseportd/control.sock)", EACCES)
        #expect(!unix.description.contains("ports below 1024"), "\(unix)")
        #expect(unix.description.contains("needs root"), "\(unix)")
        let port = ReuseportError.system("bind(udp://127.0.0.1:53)", EACCES)
        #expect(port.description.contains("ports below 1024"), "\(port)")
    }

    @Test func verdictIsTheLastMessageWithTheStatistics() {
        let log = """
            0: R1=ctx() R10=fp0
            BPF program is too large. Processed 1000001 insn
            verification time 123 usec
            stack depth 0
            processed 1000001 insns (limit 1000000) max_states_per_insn 4 total_states 14903 peak_states 500

            """
        #expect(VerifierReport.verdict(of: log)
                == "0: R1=ctx() R10=fp0 BPF program is too large. Processed 1000001 insn (processed 1000001 insns "
                    + "(limit 1000000) max_states_per_insn 4 total_states 14903 peak_states 500)")
        // A verdict split over two lines keeps both.
        #expect(VerifierReport.verdict(of: "BPF program is too large.\ninsns processed 7\nprocessed 7 insns (limit 9)\n")
                == "BPF program is too large. insns processed 7 (processed 7 insns (limit 9))")
        #expect(VerifierReport(log: log).processedInstructions == 1_000_001)
        #expect(VerifierReport(log: "").processedInstructions == nil)
    }
}
