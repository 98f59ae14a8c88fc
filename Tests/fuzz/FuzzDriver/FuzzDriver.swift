// The one driver of the fuzz targets (Tests/fuzz, docs/fuzzing.md).
#if canImport(Glibc)
import Glibc
#endif
import Foundation

#if FUZZING
/// libFuzzer's entry when the program has its own main (compiler-rt FuzzerInterface.h):
/// `int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*UserCb)(const uint8_t *, size_t))`.
/// SwiftPM links an executable with `main` renamed to the target's own entry, so libFuzzer's
/// main() is never linked in: this one calls the driver instead.
@_silgen_name("LLVMFuzzerRunDriver")
private func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// The check of the running fuzz target (a C callback cannot capture it).
nonisolated(unsafe) private var check: ((UnsafeRawBufferPointer) -> Void)?

/// libFuzzer's archive also holds a main() that calls this; the driver below is given it too.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let check else { fatalError("no fuzz target: runFuzzTarget was not called") }
    check(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}
#endif

/// Runs `body` on inputs. Built with `-sanitize=fuzzer -D FUZZING` (`make fuzz`): libFuzzer
/// chooses them, and takes libFuzzer's options and corpus folders. Built without: the files
/// named on the command line (a crash input, a corpus), each reported "ok" when it passes.
public func runFuzzTarget(_ body: @escaping (UnsafeRawBufferPointer) -> Void) -> Never {
    #if FUZZING
    check = body
    var argc = CommandLine.argc
    var argv = Optional(CommandLine.unsafeArgv)
    exit(LLVMFuzzerRunDriver(&argc, &argv, fuzzTestOneInput))
    #else
    for path in CommandLine.arguments.dropFirst() {
        guard let data = FileManager.default.contents(atPath: path) else {
            print("\(path): cannot read it")
            exit(2)
        }
        data.withUnsafeBytes(body)
        print("\(path): ok")
    }
    exit(0)
    #endif
}
