#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit
import SystemPackage

/// The name a slot's socket has in systemd's fd store: `svc.<service>.l<listener>.s<slot>.g<generation>`,
/// e.g. `svc.demo.l0.s3.g1`.
///
/// systemd takes names of at most 255 ASCII characters, none a control character or ':' (which
/// separates the names in `LISTEN_FDNAMES`; fdname_is_valid() in systemd's src/basic/fd-util.c).
/// A service name is 1 to 64 letters, digits, '-', '_' or '.' (`ServiceName`), so every name fits
/// as it is, with no escaping. A service name may hold dots: a name is read from its end.
struct StoredSocketName: Hashable, CustomStringConvertible {
    var service: String
    var listener: Int
    var slot: UInt32
    /// The generation of the slot's workers when the socket was stored (an upgrade starts a new
    /// generation on new slots). It names, it does not match: a restarted daemon gives a stored
    /// socket to its slot whatever generation the slot has now.
    var generation: UInt32 = 0

    /// Which slot's socket on which listener of which service: what a stored socket is matched by.
    struct Place: Hashable {
        var service: String
        var listener: Int
        var slot: UInt32
    }

    var place: Place { Place(service: service, listener: listener, slot: slot) }

    /// The longest name systemd accepts (FDNAME_MAX).
    static let maximumLength = 255

    var description: String { "svc.\(service).l\(listener).s\(slot).g\(generation)" }

    init(service: String, listener: Int, slot: UInt32, generation: UInt32 = 0) {
        self.service = service
        self.listener = listener
        self.slot = slot
        self.generation = generation
    }

    /// Reads a name this daemon writes; nil for any other text (a name some other program
    /// stored, a number not written as this daemon writes it).
    init?(_ text: String) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count >= 5, parts[0] == "svc" else { return nil }
        func number(_ part: Substring, _ prefix: Character) -> UInt32? {
            guard part.first == prefix, part.count > 1, part.dropFirst().allSatisfy({ $0.isASCII && $0.isNumber })
            else { return nil }
            return UInt32(part.dropFirst())
        }
        let count = parts.count
        guard let generation = number(parts[count - 1], "g"), let slot = number(parts[count - 2], "s"),
              let listener = number(parts[count - 3], "l")
        else { return nil }
        let service = parts[1..<(count - 3)].joined(separator: ".")
        guard ServiceName.isValid(service) else { return nil }
        self.init(service: service, listener: Int(listener), slot: slot, generation: generation)
        // One spelling per socket: "s03" or "s+3" would be a second name for slot 3.
        guard description == text else { return nil }
    }

    /// systemd's rule for a descriptor name.
    static func isValidFDName(_ name: String) -> Bool {
        name.utf8.count <= maximumLength && name.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ":") }
    }
}

/// The daemon's side of systemd's file-descriptor store (systemd's docs/FILE_DESCRIPTOR_STORE.md).
///
/// Under systemd with `FileDescriptorStoreMax=` (which systemd 254 and later announce as
/// `$FDSTORE`), every slot's sockets are kept in the store, one `FDSTORE=1` message with `FDNAME=`
/// (`StoredSocketName`) per socket, passed along with SCM_RIGHTS: while no daemon runs (a
/// `systemctl restart`, a crash or the watchdog with `Restart=`), systemd holds them, so they stay
/// in their reuseport group and in the old program's socket array, and datagrams that arrive
/// queue in them. The next daemon gets them back as `LISTEN_FDS`/`LISTEN_FDNAMES` and gives each
/// to the data plane at its slot (`claim`): the slots keep their sockets, the bucket table is
/// rebuilt the same from the same seed, and no flow moves; the new workers read what queued.
///
/// A slot that retires or a service that is removed has its names dropped (`FDSTOREREMOVE=1`).
/// A stop does not: systemd empties the store itself when the unit stops, and keeps it when the
/// unit restarts, which is the point. Only sockets are stored: everything else the next daemon
/// needs is in the pins or the configuration.
final class SocketStore {
    private let client: NotifyClient
    /// How many descriptors the store takes (`$FDSTORE`); 0: the store is not used.
    let capacity: Int
    let logger: Logger
    /// The names stored now, by place, as far as this daemon knows (reused ones included).
    private(set) var kept: [StoredSocketName.Place: StoredSocketName] = [:]
    /// The socket arrays stored now, by name (`arraysName`).
    private(set) var keptArrays: Set<String> = []
    /// What systemd passed at start and no service has claimed yet.
    private var inherited: [(name: String, descriptor: OwnedDescriptor)] = []
    /// Sockets sent to the store, sockets reused from it, stored descriptors refused (closed).
    private(set) var stored = 0
    private(set) var reused = 0
    private(set) var rejected = 0
    /// Sockets not stored because the store was full (said once in the log).
    private(set) var notStored = 0

    init(client: NotifyClient, environment: [String: String] = ProcessEnvironment.current, logger: Logger) {
        self.client = client
        self.logger = logger
        let announced = environment[ActivationEnvironment.fdStore].flatMap { Int($0) } ?? 0
        capacity = client.isConnected ? max(announced, 0) : 0
        do {
            // The store's descriptors come as the daemon's own LISTEN_FDS, at most LimitNOFILE of them.
            if let passed = try ActivatedSockets.take(from: environment, limit: 1 << 20) {
                inherited = zip(passed.names, passed.descriptors).map {
                    ($0, OwnedDescriptor(adopting: FileDescriptor(rawValue: $1)))
                }
                logger.notice("fd store: \(inherited.count) descriptors passed by the service manager (LISTEN_FDS)")
            }
        } catch {
            logger.warning("fd store: the descriptors passed are not used: \(error)")
        }
    }

    var isStoring: Bool { capacity > 0 }

    /// The store's name for listener `listener`'s socket array of service `service`.
    static func arrayName(service: String, listener: Int) -> String { "arr.\(service).l\(listener)" }

    /// The socket arrays of service `name`'s listeners that the previous daemon stored, one per
    /// listener or none at all (a listener without its array: none is used, and the sockets enter
    /// new arrays). An array holds the stored sockets at their slots already, so the new programs
    /// can use it and replace the old ones in one step. Descriptors that are not such an array
    /// are refused.
    func claimArrays(service name: String, listeners: Int) -> [SocketArray]? {
        var arrays: [Int: SocketArray] = [:]
        inherited.removeAll { entry in
            guard let listener = (0..<listeners).first(where: { entry.name == Self.arrayName(service: name, listener: $0) })
            else { return false }
            do {
                arrays[listener] = try SocketArray(adopting: entry.descriptor)
                keptArrays.insert(entry.name)
            } catch {
                refuse(entry.name, entry.descriptor, "\(error)")
            }
            return true
        }
        guard arrays.count == listeners else { return nil }
        return (0..<listeners).map { arrays[$0]! }
    }

    // MARK: taking sockets back at start

    /// The stored sockets of service `name` for slots below `slots`, each checked against its
    /// listener in `endpoints` (`ReuseportSocket(adopting:expected:)`: the transport, SO_REUSEPORT,
    /// the address and port, TCP listening): by slot, in listener order, only slots whose sockets
    /// on every listener check out. Every other stored socket of the service is refused (closed,
    /// logged with the reason, dropped from the store). With a listener configured on port 0,
    /// the port of its lowest reused slot is kept: the endpoints to bind the rest are returned.
    func claim(service name: String, endpoints: [Endpoint], slots: Int)
        -> (existing: [UInt32: [ReuseportSocket]], endpoints: [Endpoint])
    {
        var candidates: [UInt32: [Int: (name: StoredSocketName, descriptor: OwnedDescriptor)]] = [:]
        var unclaimed: [(name: String, descriptor: OwnedDescriptor)] = []
        for entry in inherited {
            guard let parsed = StoredSocketName(entry.name), parsed.service == name else {
                unclaimed.append(entry)
                continue
            }
            if parsed.listener >= endpoints.count {
                refuse(entry.name, entry.descriptor, "service \(name) has \(endpoints.count) listeners")
            } else if parsed.slot >= UInt32(slots) {
                refuse(entry.name, entry.descriptor, "service \(name) has \(slots) slots")
            } else if candidates[parsed.slot]?[parsed.listener] != nil {
                refuse(entry.name, entry.descriptor, "a second descriptor of that name")
            } else {
                candidates[parsed.slot, default: [:]][parsed.listener] = (parsed, entry.descriptor)
            }
        }
        inherited = unclaimed

        var resolved = endpoints
        var existing: [UInt32: [ReuseportSocket]] = [:]
        for slot in candidates.keys.sorted() {
            let found = candidates[slot]!
            var sockets: [ReuseportSocket] = []
            var failure: (listener: Int, reason: String)?
            for (listener, endpoint) in resolved.enumerated() {
                guard let entry = found[listener] else {
                    failure = (listener, "missing from the store")
                    break
                }
                do {
                    sockets.append(try ReuseportSocket(adopting: entry.descriptor, expected: endpoint))
                } catch {
                    failure = (listener, "\(error)")
                    break
                }
            }
            if let failure {
                for (listener, entry) in found {
                    let reason = listener == failure.listener ? failure.reason
                        : "slot \(slot)'s socket of listener \(failure.listener) is not usable: \(failure.reason)"
                    refuse(entry.name.description, entry.descriptor, reason)
                }
                continue
            }
            // The first reused socket of a port-0 listener fixes its port for every other slot.
            for (listener, socket) in sockets.enumerated() where resolved[listener].address.port == 0 {
                resolved[listener] = socket.endpoint
            }
            existing[slot] = sockets
            for entry in found.values { kept[entry.name.place] = entry.name }
            reused += sockets.count
        }
        if !existing.isEmpty {
            logger.notice("fd store: service \(name) reuses the stored sockets of \(existing.count) of its \(slots) slots")
        }
        return (existing, resolved)
    }

    /// Refuses what no service claimed: sockets of services, listeners or slots the configuration
    /// no longer has, and descriptors under names this daemon does not write.
    func refuseUnclaimed() {
        for entry in inherited {
            if entry.name.hasPrefix("arr.") {
                refuse(entry.name, entry.descriptor, "no configured service has that socket array")
            } else if let name = StoredSocketName(entry.name) {
                refuse(entry.name, entry.descriptor, "the configuration has no service \(name.service)")
            } else {
                refuse(entry.name, entry.descriptor, "not a name this daemon stores sockets under")
            }
        }
        inherited = []
        if reused + rejected > 0 || isStoring {
            logger.notice(
                "fd store: \(reused) sockets reused, \(rejected) refused, \(stored) stored (FileDescriptorStoreMax=\(capacity))")
        }
    }

    /// Closes a stored descriptor that is not used, says why, and drops its name from the store
    /// (every descriptor of that name goes: a socket of the same name is stored after this).
    private func refuse(_ name: String, _ descriptor: OwnedDescriptor, _ reason: String) {
        logger.warning("fd store: refusing stored descriptor \(name) (\(descriptor)): \(reason); closed and removed from the store")
        descriptor.close()
        rejected += 1
        client.notify(NotifyClient.removeMessage(name: name))
    }

    // MARK: keeping the store in step

    /// Stores the sockets of `slots` of `service` (default: every slot holding one), those not
    /// stored already. Past the store's capacity a socket is not stored, said once in the log:
    /// after a restart its slot gets a new socket (no flow moves: the table is the same), and
    /// what arrived for it while no daemon ran is lost.
    func store(_ service: ServiceRuntime, slots: [UInt32]? = nil) {
        guard isStoring else { return }
        if slots == nil { storeArrays(service) }
        for slot in slots ?? service.plane.liveSlots {
            let generation = service.plane.slotGenerations[slot] ?? service.plane.workingGeneration
            for (listener, socket) in service.plane.sockets(ofSlot: slot).enumerated() {
                let name = StoredSocketName(service: service.name, listener: listener, slot: slot, generation: generation)
                guard kept[name.place] == nil else { continue }
                // Service names are checked so that this holds (ServiceName); systemd would drop the
                // descriptor of a name it refuses.
                guard StoredSocketName.isValidFDName(name.description) else {
                    logger.error("fd store: \(name) is not a name systemd accepts: not stored")
                    continue
                }
                guard kept.count + keptArrays.count < capacity else {
                    if notStored == 0 {
                        logger.warning(
                            "fd store: full (FileDescriptorStoreMax=\(capacity)): \(name) and any further sockets are not stored; after a restart their slots get new sockets")
                    }
                    notStored += 1
                    continue
                }
                do {
                    try client.notify(NotifyClient.storeMessage(name: name.description), passing: [socket.fd])
                    kept[name.place] = name
                    stored += 1
                } catch {
                    logger.warning("fd store: cannot store \(name): \(error)")
                }
            }
        }
    }

    /// Stores each listener's socket array (not pollable: FDPOLL=0), which a restarted daemon's
    /// programs then use, so that they replace the old ones in one step.
    private func storeArrays(_ service: ServiceRuntime) {
        for (listener, entry) in service.plane.listeners.enumerated() {
            let name = Self.arrayName(service: service.name, listener: listener)
            guard !keptArrays.contains(name), StoredSocketName.isValidFDName(name),
                  kept.count + keptArrays.count < capacity
            else { continue }
            do {
                try client.notify(NotifyClient.storeMessage(name: name) + "\nFDPOLL=0",
                                  passing: [entry.program.sockets.descriptor])
                keptArrays.insert(name)
            } catch {
                logger.warning("fd store: cannot store \(name): \(error)")
            }
        }
    }

    /// Drops the stored sockets of `slots` of service `name` (with `listeners` listeners): the
    /// slots retired, or the service is removed or rebuilt.
    func remove(service name: String, listeners: Int, slots: [UInt32]) {
        for slot in slots {
            for listener in 0..<listeners {
                let place = StoredSocketName.Place(service: name, listener: listener, slot: slot)
                guard let stored = kept.removeValue(forKey: place) else { continue }
                client.notify(NotifyClient.removeMessage(name: stored.description))
            }
        }
    }

    /// Drops every stored socket of `service`.
    func remove(_ service: ServiceRuntime) {
        for listener in service.listeners.indices {
            let name = Self.arrayName(service: service.name, listener: listener)
            if keptArrays.remove(name) != nil { client.notify(NotifyClient.removeMessage(name: name)) }
        }
        let slots = Set(service.slots.map(\.index)).union(service.plane.liveSlots)
        remove(service: service.name, listeners: service.listeners.count, slots: slots.sorted())
    }
}
