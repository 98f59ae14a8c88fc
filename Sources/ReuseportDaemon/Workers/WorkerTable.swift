#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// Every worker the daemon started or took over, by the worker's pid, from its start until it
/// and every process it started are gone: one entry each, in one of its roles. It replaces six
/// tables kept in step by hand (serving, stopping, draining, processes, pidfds, and the slot's
/// pid), so that "every process the daemon started or adopted is tracked until it has exited"
/// holds by construction, and the rest is checked (`violations`).
///
/// The table decides nothing and signals nothing: the supervisor does, and records here what
/// it did.
struct WorkerTable {
    enum Role {
        /// The worker of `slot`: `slot.pid` names it.
        case serving(service: ServiceRuntime, slot: SlotRecord)
        /// Its slot was removed or replaced: it reads what was queued at the slot's sockets, or
        /// holds the TCP connections it accepted (SlotDrain).
        case draining(SlotDrain)
        /// No longer a slot's worker and not draining: being stopped, or exited with processes
        /// left behind.
        case left
    }

    struct Entry {
        var role: Role
        /// Once stopping: when SIGKILL follows (Int64.max: it was sent); nil before.
        var killAt: Int64?
        /// The worker and whatever it forked.
        let processes: WorkerProcesses
        /// A process that is not this daemon's child (a previous daemon's, taken over): its exit
        /// is seen by polling this pidfd, and signals go through it.
        var pidfd: OwnedDescriptor?
        /// The drain that ended for this worker, whose sockets the daemon keeps until no process
        /// of the worker is left: they are released then (`forgetFinished`), so that their last
        /// close is the daemon's, after they left the port.
        var ended: SlotDrain?

        /// Every drain whose sockets the entry holds: the one that ended, and one still going.
        var drains: [SlotDrain] {
            var drains = ended.map { [$0] } ?? []
            if case .draining(let drain) = role { drains.append(drain) }
            return drains
        }
    }

    private(set) var entries: [pid_t: Entry] = [:]

    // MARK: what is tracked

    /// The slot's worker `pid` is, if it is serving one.
    func serving(_ pid: pid_t) -> (service: ServiceRuntime, slot: SlotRecord)? {
        guard case .serving(let service, let slot)? = entries[pid]?.role else { return nil }
        return (service, slot)
    }

    /// The drain of the worker `pid`, if it drains.
    func drain(of pid: pid_t) -> SlotDrain? {
        guard case .draining(let drain)? = entries[pid]?.role else { return nil }
        return drain
    }

    func processes(of pid: pid_t) -> WorkerProcesses? { entries[pid]?.processes }
    func killAt(_ pid: pid_t) -> Int64? { entries[pid]?.killAt }
    func pidfd(of pid: pid_t) -> OwnedDescriptor? { entries[pid]?.pidfd }
    func contains(_ pid: pid_t) -> Bool { entries[pid] != nil }

    /// Workers serving a slot.
    var serving: [(pid: pid_t, service: ServiceRuntime, slot: SlotRecord)] {
        entries.compactMap { pid, entry in
            guard case .serving(let service, let slot) = entry.role else { return nil }
            return (pid, service, slot)
        }
    }

    var servingCount: Int { serving.count }
    /// Workers draining a removed slot, with their drains.
    var draining: [(pid: pid_t, drain: SlotDrain)] {
        entries.compactMap { pid, entry in
            guard case .draining(let drain) = entry.role else { return nil }
            return (pid, drain)
        }
    }
    var drainingPids: [pid_t] { draining.map(\.pid) }
    var stoppingPids: [pid_t] { entries.filter { $0.value.killAt != nil }.map(\.key) }
    /// Entries whose worker still runs or left processes: nothing may be forgotten before.
    var pids: [pid_t] { Array(entries.keys) }
    /// The pidfds the loop polls.
    var pidfds: [FileDescriptor] { entries.values.compactMap { $0.pidfd?.fd } }
    func pid(ofPidfd fd: FileDescriptor) -> pid_t? { entries.first { $0.value.pidfd?.fd == fd }?.key }


    // MARK: changes

    /// A worker this daemon started (`pidfd` nil) or took over, serving `slot`.
    mutating func serve(_ pid: pid_t, processes: WorkerProcesses, pidfd: OwnedDescriptor? = nil,
                        service: ServiceRuntime, slot: SlotRecord) {
        entries[pid] = Entry(role: .serving(service: service, slot: slot), killAt: nil, processes: processes, pidfd: pidfd)
    }

    /// A previous daemon's process taken over with no slot of its own (a leaving worker, or one
    /// to stop), watched through `pidfd`.
    mutating func track(_ pid: pid_t, processes: WorkerProcesses, pidfd: OwnedDescriptor) {
        entries[pid]?.pidfd?.close()
        entries[pid] = Entry(role: .left, killAt: nil, processes: processes, pidfd: pidfd)
    }

    /// The worker no longer serves its slot (it is stopped, replaced, or exited); nothing if it
    /// did not serve one.
    @discardableResult
    mutating func leaveSlot(_ pid: pid_t) -> (service: ServiceRuntime, slot: SlotRecord)? {
        guard let served = serving(pid) else { return nil }
        entries[pid]?.role = .left
        return served
    }

    /// The worker's slot was removed or replaced: it drains.
    mutating func startDrain(_ pid: pid_t, _ drain: SlotDrain) {
        entries[pid]?.role = .draining(drain)
    }

    /// Its drain ended; returns it. The drain stays with the entry until it is forgotten.
    mutating func endDrain(_ pid: pid_t) -> SlotDrain? {
        guard let drain = drain(of: pid) else { return nil }
        entries[pid]?.role = .left
        entries[pid]?.ended = drain
        return drain
    }

    /// Keeps `drain`'s sockets with the worker's entry until every process of the worker is
    /// gone (`forgetFinished` returns it then), for a worker that does not drain.
    mutating func keepUntilGone(_ pid: pid_t, _ drain: SlotDrain) {
        entries[pid]?.ended = drain
    }

    /// The worker is being stopped: SIGKILL at `killAt`. Its role stays (`leaveSlot` first to
    /// take it off its slot). `keepingEarlier`: a deadline set already stays (a worker that
    /// missed its watchdog while stopping is not given longer).
    mutating func stop(_ pid: pid_t, killAt: Int64, keepingEarlier: Bool = false) {
        guard entries[pid] != nil else { return }
        if keepingEarlier, entries[pid]?.killAt != nil { return }
        entries[pid]?.killAt = killAt
    }

    /// SIGKILL was sent: no deadline any more, the exit is awaited.
    mutating func killSent(_ pid: pid_t) { entries[pid]?.killAt = Int64.max }

    /// A second stop signal: every stopping worker's SIGKILL is due now.
    mutating func killStoppingNow() {
        for pid in stoppingPids { entries[pid]?.killAt = 0 }
    }

    /// The process is not this daemon's to watch through a pidfd any more (reaped as a child).
    mutating func closePidfd(of pid: pid_t) {
        entries[pid]?.pidfd?.close()
        entries[pid]?.pidfd = nil
    }

    /// Forgets every worker that exited and whose processes are all gone; returns the drains
    /// whose sockets are now the daemon's alone, to release.
    mutating func forgetFinished() -> [SlotDrain] {
        var released: [SlotDrain] = []
        for (pid, entry) in entries where entry.processes.leaderExited && entry.processes.release() {
            entry.pidfd?.close()
            entries.removeValue(forKey: pid)
            released += entry.drains
        }
        return released
    }

    /// Forgets everything (after SIGKILL to all and every child reaped), closing the pidfds;
    /// returns every drain, ended or not, to release.
    mutating func removeAll() -> [SlotDrain] {
        for entry in entries.values { entry.pidfd?.close() }
        let drains = entries.values.flatMap(\.drains)
        entries.removeAll()
        return drains
    }



    // MARK: invariants

    /// What must hold between the table and the slots of `services`; empty when all does:
    /// - a serving entry is its slot's worker (`slot.pid`), and its slot is one of its service's;
    /// - every slot's worker is a serving entry of that slot;
    /// - a serving or draining worker's leader has not been seen to exit.
    /// (A worker being stopped may still serve: one that missed its watchdog is its slot's
    /// worker until it exits.)
    func violations(services: [ServiceRuntime]) -> [String] {
        var found: [String] = []
        for (pid, entry) in entries {
            switch entry.role {
            case .serving(let service, let slot):
                if slot.pid != pid { found.append("pid \(pid) serves slot \(slot.index), whose worker is \(slot.pid.map(String.init) ?? "none")") }
                if !services.contains(where: { $0 === service }) || !service.slots.contains(where: { $0 === slot }) {
                    found.append("pid \(pid) serves slot \(slot.index) of a service or slot that is gone")
                }
                if entry.processes.leaderExited { found.append("pid \(pid) exited but still serves slot \(slot.index)") }
            case .draining(let drain):
                if entry.processes.leaderExited { found.append("pid \(pid) exited but still drains slot \(drain.slot)") }
            case .left:
                break
            }
        }
        for service in services {
            for slot in service.slots {
                guard let pid = slot.pid else { continue }
                guard let served = serving(pid), served.slot === slot else {
                    found.append("\(service.name) slot \(slot.index) names worker pid \(pid), which the table does not have serving it")
                    continue
                }
            }
        }
        return found
    }
}
