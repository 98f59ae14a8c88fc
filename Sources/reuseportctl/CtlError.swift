import ArgumentParser
import ReuseportKit

/// A runtime failure of a command: the daemon, the pins or the kernel did not give what was
/// asked. `main` prints it and exits with status 1 (bad arguments exit with 2 before any
/// command runs). Each case says where it looked and what to try.
enum CtlError: Error, CustomStringConvertible {
    case noPins(root: String, reason: String)
    /// The pin root, or a folder above it, is one that someone other than root could change.
    case untrustedPins(UntrustedPathError)
    case noSuchService(String, root: String, existing: [String])
    case serviceNeeded(existing: [String], root: String)
    case daemonServiceNeeded(existing: [String], socket: String)
    case noSuchDaemonService(String, socket: String, existing: [String])
    case unreadablePins(service: String, directory: String, underlying: Error)
    case daemonRefused(String)
    /// The pins do not hold what the question needs (which listener, which address).
    case unanswerable(String)
    case featuresMissing(String)
    case timeout(String)
    /// An upgrade gave up before its switch: the old generation serves on.
    case upgradeAbandoned(service: String, generation: Int, reason: String)
    case canaryRolledBack(service: String, generation: Int, reason: String)
    case kernel(Error)
    /// An argument only the daemon's answer shows to be wrong (a slot the service does not have):
    /// `main` exits with status 2, as for the argument errors found while parsing, with `command`'s usage.
    case badArgument(String, command: ParsableCommand.Type)
    /// Some services were shown, these could not be read.
    case unreadable([CtlError])

    var description: String {
        switch self {
        case .noPins(let root, let reason):
            return "no services pinned under \(root): \(reason)"
                + (reason.hasPrefix("permission") ? "" : "\n  is reuseportd running, and does --pin-dir name its pin folder?")
        case .untrustedPins(let error):
            return "not reading the pins: \(error)\n  reuseportd refuses such a folder too: "
                + "it must be a real folder owned by root that only root can write"
        case .noSuchService(let name, let root, let existing):
            return "no service '\(name)' under \(root); pinned there: \(existing.joined(separator: ", "))"
        case .noSuchDaemonService(let name, let socket, let existing):
            return "the daemon at \(socket) runs no service '\(name)'; it runs: \(existing.joined(separator: ", "))"
        case .daemonServiceNeeded(let existing, let socket):
            return "the daemon at \(socket) runs several services (\(existing.joined(separator: ", "))):"
                + " choose one with --service NAME"
        case .serviceNeeded(let existing, let root):
            return "several services are pinned under \(root) (\(existing.joined(separator: ", "))): "
                + "choose one with --service NAME"
        case .unreadablePins(let service, let directory, let underlying):
            return "cannot read the maps of service '\(service)' in \(directory): \(underlying)"
        case .daemonRefused(let reason):
            return "the daemon refused: \(reason)"
        case .unanswerable(let reason), .featuresMissing(let reason):
            return reason
        case .timeout(let reason):
            return reason
        case .upgradeAbandoned(let service, let generation, let reason):
            return "\(service): generation \(generation) was abandoned: \(reason); the previous generation serves on"
        case .canaryRolledBack(let service, let generation, let reason):
            return "\(service): generation \(generation)'s canary was rolled back: \(reason)"
        case .kernel(let error):
            return "\(error)"
        case .badArgument(let reason, _):
            return reason
        case .unreadable(let failures):
            return failures.map(\.description).joined(separator: "\nreuseportctl: error: ")
        }
    }
}
