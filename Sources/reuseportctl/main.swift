#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ArgumentParser
import CLibbpf

// Only this file decides exit codes: 0 success, 1 runtime error (CtlError and anything
// a command throws), 2 bad arguments (ArgumentParser's parse and validate() errors).

/// `--watch [SECONDS]`: ArgumentParser has no option with an optional value, so an interval
/// given right after --watch (or as --watch=SECONDS) becomes `--watch --interval SECONDS`.
func expandingWatchInterval(_ arguments: [String]) -> [String] {
    var result: [String] = []
    var index = 0
    while index < arguments.count {
        let argument = arguments[index]
        if argument.hasPrefix("--watch="), Double(argument.dropFirst("--watch=".count)) != nil {
            result += ["--watch", "--interval", String(argument.dropFirst("--watch=".count))]
        } else if argument == "--watch", index + 1 < arguments.count, Double(arguments[index + 1]) != nil {
            result += ["--watch", "--interval", arguments[index + 1]]
            index += 1
        } else {
            result.append(argument)
        }
        index += 1
    }
    return result
}

func writeStandardError(_ text: String) {
    try? Array(text.utf8).withUnsafeBytes { try Syscall.writeAll(.standardError, $0, "write(stderr)") }
}

/// Ends the process for `error`: help and clean exits 0 (ArgumentParser prints them),
/// argument errors 2 with ArgumentParser's message and usage, anything else 1.
/// Every error, an argument error too, is printed as `reuseportctl: error: ...` (ArgumentParser's
/// own prefix, `Error: `, is replaced), with the usage after an argument error.
func exit(for error: Error) -> Never {
    if case .badArgument(let reason, let command) = error as? CtlError {
        writeStandardError("reuseportctl: error: \(reason)\n"
            + "Usage: \(ReuseportCtl.usageString(for: command))\n"
            + "  See 'reuseportctl \(command.configuration.commandName ?? "") --help' for more information.\n")
        exit(2)
    }
    let code = ReuseportCtl.exitCode(for: error)
    if code == .success { ReuseportCtl.exit(withError: error) }
    if code == .validationFailure {
        var message = ReuseportCtl.fullMessage(for: error)
        if message.hasPrefix("Error: ") { message = "reuseportctl: error: " + message.dropFirst("Error: ".count) }
        writeStandardError(message + "\n")
        exit(2)
    }
    if let exitCode = error as? ExitCode { exit(exitCode.rawValue) }
    writeStandardError("reuseportctl: error: \(error)\n")
    exit(1)
}

// libbpf's own messages would repeat, less precisely, what our errors say (call, errno, hint).
libbpf_set_print(nil)
do {
    var command = try ReuseportCtl.parseAsRoot(expandingWatchInterval(Array(CommandLine.arguments.dropFirst())))
    try command.run()
} catch {
    exit(for: error)
}
