#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import ReuseportTestSupport

// kernel-check: the kernel-feature suite. Runs on the host (`make kernel-test`) and as
// the only program inside the test VMs (`make vmtest`), so it is a plain executable that
// prints one line per result:
//
//   KERNEL <release>
//   CHECK <name> PASS|FAIL|SKIP <detail>
//   VALUE <name> <key>=<value>          measured values (recorded, not judged)
//   <n> passed, <n> failed, <n> skipped
//
// Each check runs in its own child process (this program again, `run-one`), so a crash
// or a hang in one check is reported as that check's failure and the others still run.

let usage = """
    usage: kernel-check [--list] [--break CHECK] [--timeout SECONDS] [--no-values] [CHECK...]
      CHECK           a check name, or a prefix ending in '*' (exact-*); default: all
      --list          print the checks and what each proves
      --break CHECK   make CHECK expect a wrong result, to show that the suite can fail
                      (also KERNEL_CHECK_BREAK=CHECK)
      --timeout S     per-check time limit (default 120)
      --no-values     leave out the VALUE lines (measurements)
    internal: kernel-check run-one CHECK [--broken] | reopen-pins ROOT SERVICE | hold
    """

let checks: [Check] = ProgramChecks.all + SteeringChecks.all + QuicChecks.all + SocketArrayChecks.all + PinChecks.all
    + ProcessChecks.all + DaemonCheck.all

func fail(_ message: String, status: Int32 = 2) -> Never {
    Output.error("kernel-check: \(message)")
    exit(status)
}

func kernelRelease() -> String {
    var names = utsname()
    uname(&names)
    return withUnsafeBytes(of: names.release) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
}

/// Runs one check in this process and prints its CHECK line. Returns the exit status.
func runOne(_ check: Check, broken: Bool) -> Int32 {
    let context = CheckContext(name: check.name, broken: broken)
    let start = MonotonicClock.milliseconds()
    func elapsed() -> String { "[\(MonotonicClock.milliseconds() - start) ms]" }
    do {
        let detail = try check.run(context)
        Output.line("CHECK \(check.name) PASS \(detail) \(elapsed())")
        return 0
    } catch let skip as CheckSkip {
        Output.line("CHECK \(check.name) SKIP \(skip.description)")
        return 0
    } catch {
        Output.line("CHECK \(check.name) FAIL \(error) \(elapsed())")
        return 1
    }
}

/// Runs each selected check in a child process; relays its lines; returns the exit status.
func runAll(_ selected: [Check], broken: String?, timeoutSeconds: Int, values: Bool) -> Int32 {
    Output.line("KERNEL \(kernelRelease())")
    var passed = 0, failed = 0, skipped = 0
    // Like the Swift tests: without root nothing here can load, so every check says why it skips.
    let skipReason = geteuid() == 0 ? nil : "not root: loading BPF programs needs root (or CAP_BPF + CAP_NET_ADMIN)"
    for check in selected {
        if let skipReason {
            Output.line("CHECK \(check.name) SKIP \(skipReason)")
            skipped += 1
            continue
        }
        var arguments = ["run-one", check.name]
        if broken == check.name { arguments.append("--broken") }
        var result: String
        do {
            let child = try Subprocess(BuiltProducts.selfPath, arguments)
            let status = child.wait(timeoutMs: timeoutSeconds * 1000)
            let lines = child.text.split(separator: "\n").map(String.init)
            for line in lines where values || !line.hasPrefix("VALUE ") { Output.line(line) }
            let prefix = "CHECK \(check.name) "
            if let line = lines.last(where: { $0.hasPrefix(prefix) }) {
                result = String(line.dropFirst(prefix.count).prefix(4))
            } else {
                let why = status.map { "exited (\($0)) without a result" }
                    ?? "did not finish in \(timeoutSeconds) s"
                Output.line("CHECK \(check.name) FAIL \(why)")
                result = "FAIL"
            }
        } catch {
            Output.line("CHECK \(check.name) FAIL cannot start: \(error)")
            result = "FAIL"
        }
        switch result {
        case "PASS": passed += 1
        case "SKIP": skipped += 1
        default: failed += 1
        }
    }
    Output.line("\(passed) passed, \(failed) failed, \(skipped) skipped")
    return failed == 0 ? 0 : 1
}

func select(_ patterns: [String]) -> [Check] {
    if patterns.isEmpty { return checks }
    var selected: [Check] = []
    for pattern in patterns {
        let matches = pattern.hasSuffix("*")
            ? checks.filter { $0.name.hasPrefix(pattern.dropLast()) }
            : checks.filter { $0.name == pattern }
        if matches.isEmpty { fail("no check named '\(pattern)' (see --list)") }
        selected += matches.filter { match in !selected.contains { $0.name == match.name } }
    }
    return selected
}

func main() -> Int32 {
    var arguments = Array(CommandLine.arguments.dropFirst())
    switch arguments.first {
    case "run-one":
        guard arguments.count >= 2, let check = checks.first(where: { $0.name == arguments[1] }) else {
            fail("run-one needs a check name")
        }
        return runOne(check, broken: arguments.dropFirst(2).contains("--broken"))
    case "hold":
        // A process that holds what it inherited until it is killed (pidfd-getfd-socket).
        while true { pause() }
    case "reopen-pins":
        guard arguments.count == 3 else { fail("reopen-pins needs ROOT SERVICE") }
        do {
            try PinChecks.reopen(root: arguments[1], service: arguments[2])
            return 0
        } catch {
            fail("reopen-pins: \(error)", status: 1)
        }
    default:
        break
    }

    var broken = getenv("KERNEL_CHECK_BREAK").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }
    var timeout = 120
    var values = true
    var patterns: [String] = []
    while !arguments.isEmpty {
        let argument = arguments.removeFirst()
        switch argument {
        case "--list":
            for check in checks { Output.line("\(check.name)\t\(check.summary)") }
            return 0
        case "--break":
            guard !arguments.isEmpty else { fail("--break needs a check name") }
            broken = arguments.removeFirst()
        case "--timeout":
            guard let value = arguments.first.flatMap({ Int($0) }), value > 0 else {
                fail("--timeout needs a positive number of seconds")
            }
            arguments.removeFirst()
            timeout = value
        case "--no-values":
            values = false
        case "-h", "--help":
            Output.line(usage)
            return 0
        default:
            if argument.hasPrefix("-") { fail("unknown option '\(argument)'\n\(usage)") }
            patterns.append(argument)
        }
    }
    if let broken {
        guard let check = checks.first(where: { $0.name == broken }) else { fail("--break: no check named '\(broken)'") }
        guard check.breakable else {
            fail("--break: '\(broken)' has no way to break; these do: "
                 + checks.filter(\.breakable).map(\.name).joined(separator: " "))
        }
    }
    return runAll(select(patterns), broken: broken, timeoutSeconds: timeout, values: values)
}

exit(main())
