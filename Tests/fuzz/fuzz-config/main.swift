// The configuration parser's fuzz target (`make fuzz`, docs/fuzzing.md); FuzzDriver runs it.
import Foundation
import FuzzDriver
import ReuseportDaemon

/// One input, as `ConfigurationParser.load` would read it from a file. Whatever it holds,
/// the parser returns a configuration or throws a `ConfigurationError`; and either survives
/// the JSON a reload's child writes for the daemon (ConfigurationCheck) unchanged.
func fuzzConfiguration(_ bytes: UnsafeRawBufferPointer) {
    let text = String(decoding: bytes, as: UTF8.self)
    let outcome: ConfigurationCheck.Outcome
    do {
        outcome = .valid(try ConfigurationParser.parse(text, file: "fuzz.toml"))
    } catch {
        outcome = .invalid(error)
    }
    guard let json = try? JSONEncoder().encode(outcome),
          let back = try? JSONDecoder().decode(ConfigurationCheck.Outcome.self, from: json)
    else { fatalError("the outcome does not survive its JSON: \(outcome)") }
    switch (outcome, back) {
    case (.valid(let sent), .valid(let received)) where sent == received: break
    case (.invalid(let sent), .invalid(let received)) where sent == received: break
    default: fatalError("the outcome changed through its JSON: \(outcome) → \(back)")
    }
}

runFuzzTarget(fuzzConfiguration)
