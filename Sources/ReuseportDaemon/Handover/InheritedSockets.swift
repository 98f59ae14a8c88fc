#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit
import SystemPackage

/// Slot sockets the previous image of this daemon handed over when it exec'ed itself in place
/// (`Daemon.reexec`): every slot's, including slots whose worker is down at that moment, whose
/// sockets no worker could give back. Named by service, listener and slot in
/// `REUSEPORTD_SLOT_SOCKETS` ("service/listener/slot=fd", comma-separated). A service takes its
/// own (`take`); each is used only if it checks out against the pinned socket array
/// (ServiceRuntime), and whatever is left is closed (`closeRest`).
final class InheritedSockets {
    static let variable = "REUSEPORTD_SLOT_SOCKETS"

    struct Name: Hashable, CustomStringConvertible {
        var service: String
        var listener: Int
        var slot: UInt32
        var description: String { "\(service)/\(listener)/\(slot)" }
    }

    private var sockets: [Name: OwnedDescriptor] = [:]

    init() {}

    /// The sockets named in the environment (the variable is removed): entries whose descriptor
    /// is not an open socket are ignored.
    static func fromEnvironment() -> InheritedSockets {
        let inherited = InheritedSockets()
        guard let value = getenv(variable).map({ String(cString: $0) }) else { return inherited }
        unsetenv(variable)
        for entry in value.split(separator: ",") {
            let pair = entry.split(separator: "=")
            let parts = pair.first?.split(separator: "/") ?? []
            guard pair.count == 2, parts.count == 3, let listener = Int(parts[1]), let slot = UInt32(parts[2]),
                  let fd = Int32(pair[1]), fd > 2
            else { continue }
            var info = stat()
            guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { continue }
            let descriptor = OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
            try? Syscall.setCloseOnExec(descriptor.fd, true)
            inherited.sockets[Name(service: String(parts[0]), listener: listener, slot: slot)] = descriptor
        }
        return inherited
    }

    /// The value of the variable for `sockets`.
    static func encode(_ sockets: [(Name, FileDescriptor)]) -> String {
        sockets.map { "\($0.0)=\($0.1.rawValue)" }.joined(separator: ",")
    }

    var isEmpty: Bool { sockets.isEmpty }

    /// Removes and returns `service`'s sockets, by slot, then listener.
    func take(service: String) -> [UInt32: [Int: OwnedDescriptor]] {
        var taken: [UInt32: [Int: OwnedDescriptor]] = [:]
        for (name, descriptor) in sockets where name.service == service {
            taken[name.slot, default: [:]][name.listener] = descriptor
            sockets.removeValue(forKey: name)
        }
        return taken
    }

    /// Closes the sockets no service took (its service is gone from the configuration).
    func closeRest(logger: Logger) {
        guard !sockets.isEmpty else { return }
        let names = sockets.keys.map(\.description).sorted().joined(separator: ", ")
        logger.notice("closing \(sockets.count) handed-over sockets no configured service takes: \(names)")
        for descriptor in sockets.values { descriptor.close() }
        sockets.removeAll()
    }
}
