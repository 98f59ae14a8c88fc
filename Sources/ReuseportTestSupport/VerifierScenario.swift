#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import CReuseportTestPrograms
import ReuseportKit

/// The verifier's side of the data plane: what loading costs, and what a refusal says.
/// Run by a `@Test` on the running kernel and by kernel-check on every kernel of the VM matrix.
public enum VerifierScenario {
    /// The most instructions the verifier may process for rp_dispatch on any kernel we test.
    ///
    /// The kernel refuses a program past 1,000,000 (BPF_COMPLEXITY_LIMIT_INSNS), and how many
    /// it processes for the same object changes with the kernel's pruning: the probe loop of
    /// ABI 1 passed on 5.10 to 6.18 and was refused on 7.2. The budget is 5 % of the limit, a
    /// factor of 20 against such swings, and still leaves the features to come (flow tracking,
    /// generations, QUIC connection IDs) room to grow from today's program (under 1,000) to
    /// about 50 times its size. A program over budget must be made cheaper, not the budget larger.
    public static let dispatchBudget = 50_000

    /// The program of bpf/too_large.bpf.c.
    public static let tooLargeProgram = RP_PROG_TEST_TOO_LARGE

    /// Loads the steering program; fails if the verifier processed more than the budget.
    /// Returns the processed count.
    public static func dispatchWithinBudget() throws -> Int {
        let program = try DispatchProgram()
        guard let processed = program.verifier.processedInstructions else {
            throw ScenarioFailure("the verifier's log has no \"processed N insns\" line: \(program.verifier.log)")
        }
        try require(processed <= dispatchBudget,
                    "\(RP_PROG_DISPATCH): the verifier processed \(processed) instructions, over the budget of "
                        + "\(dispatchBudget)")
        return processed
    }

    /// What the verifier says of each program of bpf/baseline.bpf.c (the benchmarks' references).
    public static func baselineReports() throws -> [String: VerifierReport] {
        try VerifierReport.verify(object: rp_baseline_object(), count: rp_baseline_object_size(), name: "baseline.bpf.o")
    }

    /// Loads bpf/too_large.bpf.c, which every verifier must refuse as too large, and checks what
    /// the error says: the program, the verifier's verdict naming its limit, a log file that
    /// holds it, and no hint meant for map calls. Returns the error's text.
    public static func refusalNamesTheVerdict() throws -> String {
        let error: ReuseportError
        do {
            let reports = try VerifierReport.verify(object: rp_test_too_large_object(),
                                                    count: rp_test_too_large_object_size(), name: "too_large.bpf.o")
            throw ScenarioFailure("the verifier accepted \(RP_PROG_TEST_TOO_LARGE): \(reports)")
        } catch let refused as ReuseportError {
            error = refused
        }
        guard case .programRefused(_, let program, let code, let verdict, let logPath) = error else {
            throw ScenarioFailure("expected a refusal by the verifier, got: \(error)")
        }
        let text = error.description
        try require(program == RP_PROG_TEST_TOO_LARGE, "the error names program \(program)")
        try require(code == E2BIG, "errno \(code), expected E2BIG (\(E2BIG)): \(text)")
        let log = try logPath.map { String(decoding: try Syscall.readFile($0), as: UTF8.self) } ?? ""
        try require(verdict.contains("too large") && verdict.contains("processed 1000001 insns (limit 1000000)"),
                    "the verdict does not name the verifier's limit: \(verdict); the log: \(log)")
        try require(!text.contains("the key is beyond the map's size"), "a map hint on a program load: \(text)")
        let path = try logPath ?? { throw ScenarioFailure("no verifier log file: \(text)") }()
        try require(text.contains(path), "the error does not name the log file: \(text)")
        try require(log.contains("processed 1000001 insns"), "the log file \(path) lacks the verdict: \(log)")
        unlink(path)
        return text
    }
}
