#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportKit

/// What a daemon started on a previous daemon's pins (after a crash, a kill, or its own exec)
/// finds of that daemon's workers, slot by slot from rp_slot_state.
///
/// A worker is taken over only when it is proven to be that slot's worker and its sockets are
/// the slot's sockets:
/// 1. **The process.** The row's pid must be alive with the start time the row recorded
///    (`Syscall.processStartTime`): a pid reused by another process has another start time.
///    The check is made again after `pidfd_open`, so the pidfd names that very process, and
///    every later signal goes through it (pidfd_send_signal), never to a reused pid.
/// 2. **The sockets.** Each listener's socket is copied out of the worker (`pidfd_getfd`, 5.6;
///    CAP_SYS_PTRACE for a worker of another user) from whichever of its descriptors is a
///    socket, and must have the cookie the pinned rp_sockets array holds at the slot.
///
/// A process that fails step 1 is not ours: it is reported, never signalled. A worker that
/// passes 1 but not 2 (its socket is gone, or cannot be copied, or the configuration now
/// names other addresses) is ours but cannot serve the new data plane: it is stopped.
struct WorkerAdoption {
    /// A worker proven to be the slot's, with copies of its sockets.
    struct Adopted {
        var slot: UInt32
        var pid: pid_t
        var pidfd: OwnedDescriptor
        var startTime: UInt64
        /// In listener order.
        var sockets: [ReuseportSocket]
        /// Its row as the previous daemon left it (restarts, stalls, watchdog restarts).
        var row: rp_slot_state
    }

    /// A worker proven to be the slot's whose sockets could not be taken over: to be stopped.
    struct Unusable {
        var slot: UInt32
        var pid: pid_t
        var pidfd: OwnedDescriptor
        var reason: String
    }

    var adopted: [Adopted] = []
    var unusable: [Unusable] = []
    /// Rows naming a process that is not the slot's worker (pid reused, no start time): slot,
    /// pid and why. Nothing is done to those processes.
    var refused: [(slot: UInt32, pid: pid_t, reason: String)] = []
    /// Rows whose worker has exited: the slot gets a new socket and worker.
    var gone: [UInt32] = []

    /// Whether any process of the previous daemon's still runs: its sockets hold the service's
    /// addresses, so they are this service's own groups, not taken ones.
    var foundWorkers: Bool { !adopted.isEmpty || !unusable.isEmpty }

    /// The adopted workers' sockets by slot, for `ServiceDataPlane(…, existing:)`.
    var sockets: [UInt32: [ReuseportSocket]] {
        Dictionary(uniqueKeysWithValues: adopted.map { ($0.slot, $0.sockets) })
    }

    /// Examines every row of `maps`' rp_slot_state up to `slotLimit` slots whose pid is set.
    /// `endpoints`: the configured listeners, which the sockets must match; `arrays`: their
    /// pinned socket arrays (nil where none could be opened), whose cookies the sockets must have.
    init(maps: DispatchMaps, arrays: [SocketArray?], endpoints: [Endpoint], slotLimit: Int) {
        for slot in 0..<UInt32(slotLimit) {
            guard let row = try? maps.readSlotState(slot), row.pid != 0 else { continue }
            let pid = pid_t(row.pid)
            switch Self.identify(pid, startTime: row.start_time) {
            case .gone:
                gone.append(slot)
            case .other(let reason):
                refused.append((slot, pid, reason))
            case .worker(let pidfd):
                do {
                    let cookies = try arrays.enumerated().map { index, array in
                        guard let array, let cookie = try array.cookie(at: slot) else {
                            throw DaemonError.adoption("listener \(index) has no socket at slot \(slot) in its pinned array")
                        }
                        return cookie
                    }
                    let sockets = try Self.copySockets(of: pid, pidfd, cookies: cookies).enumerated().map {
                        try ReuseportSocket(adopting: $0.element, expected: endpoints[$0.offset])
                    }
                    adopted.append(Adopted(slot: slot, pid: pid, pidfd: pidfd, startTime: row.start_time,
                                           sockets: sockets, row: row))
                } catch {
                    unusable.append(Unusable(slot: slot, pid: pid, pidfd: pidfd, reason: "\(error)"))
                }
            }
        }
    }

    enum Identity {
        case worker(OwnedDescriptor)
        case other(String)
        case gone
    }

    /// Whether `pid` is the process that started at `startTime`, as a pidfd bound to it.
    static func identify(_ pid: pid_t, startTime: UInt64) -> Identity {
        guard startTime != 0 else { return .other("no start time recorded for pid \(pid): it cannot be told from a reused pid") }
        guard let before = try? Syscall.processStartTime(pid) else { return .gone }
        guard before == startTime else {
            return .other("pid \(pid) now belongs to another process (started at tick \(before), the worker at \(startTime))")
        }
        guard let pidfd = try? Syscall.pidfdOpen(pid) else { return .gone }
        // The pid could have been reused between the read and pidfd_open: read it again, now
        // that the pidfd holds whichever process it is.
        guard let after = try? Syscall.processStartTime(pid) else { return .gone }
        return after == startTime ? .worker(pidfd) : .other("pid \(pid) was reused while it was examined")
    }

    /// Copies of the worker's sockets whose cookies are `cookies`, in that order.
    static func copySockets(of pid: pid_t, _ pidfd: OwnedDescriptor, cookies: [UInt64]) throws -> [OwnedDescriptor] {
        var found: [UInt64: OwnedDescriptor] = [:]
        var lastError: Error?
        for fd in Syscall.socketDescriptors(of: pid) where found.count < cookies.count {
            do {
                let copy = try Syscall.pidfdGetDescriptor(pidfd, fd)
                let cookie = try Syscall.getOption(copy.fd.rawValue, SOL_SOCKET, SO_COOKIE, UInt64.self, "SO_COOKIE")
                if cookies.contains(cookie), found[cookie] == nil { found[cookie] = copy }
            } catch {
                lastError = error
            }
        }
        return try cookies.enumerated().map { index, cookie in
            guard let socket = found.removeValue(forKey: cookie) else {
                throw DaemonError.adoption("pid \(pid) holds no socket with listener \(index)'s cookie \(cookie)"
                    + (lastError.map { " (\($0))" } ?? ""))
            }
            return socket
        }
    }
}

