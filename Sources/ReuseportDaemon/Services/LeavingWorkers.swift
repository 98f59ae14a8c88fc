#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import ReuseportKit

/// Workers that left their slot and still run: a retired slot's worker draining its queue or
/// holding the TCP connections it accepted, a replaced or scaled-away worker stopping. They are
/// derived from what the supervisor tracks (a worker start whose process runs and that is no
/// slot's worker), named in `status`, and pinned (rp_leaving, `LeavingRecords`) so that a daemon
/// started on the pins takes them over: none is left holding the port with no daemon to stop it.
extension Supervisor {
    /// The leaving workers of `service`, by pid.
    func leaving(of service: String) -> [LeavingRecords.Record] {
        table.entries.filter { pid, entry in
            entry.processes.origin.service == service && !entry.processes.leaderExited && table.serving(pid) == nil
        }
            .sorted { $0.key < $1.key }
            .map { pid, entry in
                let started = entry.processes
                var state = RP_LEAVING_STOPPING
                var hold: UInt64 = 0
                if let drain = table.drain(of: pid) {
                    if let until = drain.holdWorkerUntil, drain.listenersReleased {
                        state = RP_LEAVING_HOLDING
                        hold = UInt64(max(until, 0))
                    } else {
                        state = RP_LEAVING_DRAINING
                    }
                }
                return LeavingRecords.Record(pid: pid, slot: started.origin.slot, generation: started.origin.generation,
                                             startTime: started.origin.startTime, holdUntilNs: hold, state: state)
            }
    }

    /// Writes every service's leaving workers to its pinned rp_leaving (what changed only).
    func publishLeaving() {
        for service in services {
            do {
                try service.leavingRecords?.publish(leaving(of: service.name))
            } catch {
                service.logger.error("cannot write the leaving workers to \(RP_MAP_LEAVING): \(error)")
            }
        }
    }

    /// Takes over the leaving workers a previous daemon pinned for `service`: each proven by its
    /// start time (WorkerAdoption.identify), then watched through its pidfd. One holding its TCP
    /// connections keeps them until its hold ends; one draining a UDP service's removed slot
    /// drains on (it is stopped once its queues stayed empty, as before the restart); any other
    /// is stopped (SIGTERM, SIGKILL at the stop timeout).
    ///
    /// Its UDP sockets are copied out of it (`udpSockets`): the daemon holds them until every
    /// process of the worker is gone, so that their last close is the daemon's, after they left
    /// the port (SlotDrain.release), as for a worker of its own.
    func adoptLeaving(of service: ServiceRuntime) {
        let now = MonotonicClock.nanoseconds()
        for record in service.takeInheritedLeaving() where !table.contains(record.pid) {
            let pid = record.pid
            let row = record.value
            switch WorkerAdoption.identify(pid, startTime: row.start_time) {
            case .gone:
                continue
            case .other(let reason):
                service.refusedAdoptions += 1
                service.logger.warning("leaving worker of slot \(row.slot): not adopting pid \(pid), and not signalling it: \(reason)")
            case .worker(let pidfd):
                track(adopted: WorkerProcesses(
                    leader: pid, cgroup: WorkerCgroups.cgroup(of: pid),
                    origin: WorkerOrigin(service: service.name, slot: row.slot, generation: row.generation,
                                         startTime: row.start_time)), pidfd: pidfd)
                let hold = Int64(clamping: row.hold_until_ns)
                let drain = SlotDrain(service: service, slot: row.slot, sockets: udpSockets(of: pid, pidfd, service),
                                      deadline: now + configuration.stopTimeoutMs.msAsNs, now: now)
                let onlyUDP = !service.listeners.contains { $0.transport == .tcp }
                if row.state == RP_LEAVING_HOLDING.rawValue, hold > now {
                    // Its listeners were released before the restart: it only holds connections.
                    drain.holdWorkerUntil = hold
                    drain.listenersReleased = true
                    table.startDrain(pid, drain)
                    service.logger.notice(
                        "slot \(row.slot): adopted leaving worker pid \(pid) of generation \(row.generation); it keeps its connections for \((hold - now) / 1_000_000) ms")
                } else if row.state == RP_LEAVING_DRAINING.rawValue, onlyUDP, !drain.sockets.isEmpty {
                    table.startDrain(pid, drain)
                    service.logger.notice(
                        "slot \(row.slot): adopted leaving worker pid \(pid) of generation \(row.generation); it drains on what was queued at its slot")
                } else {
                    table.stop(pid, killAt: now + configuration.stopTimeoutMs.msAsNs)
                    table.keepUntilGone(pid, drain)
                    try? Syscall.pidfdSignal(pidfd, SIGTERM)
                    service.logger.notice(
                        "slot \(row.slot): adopted leaving worker pid \(pid) of generation \(row.generation): stopping it")
                }
            }
        }
    }

    /// Copies of the UDP sockets of `service` that the leaving worker `pid` holds (pidfd_getfd,
    /// as WorkerAdoption copies a serving worker's), each checked as the daemon's own would be;
    /// none if they cannot be copied (logged: their last close is then the worker's).
    func udpSockets(of pid: pid_t, _ pidfd: OwnedDescriptor, _ service: ServiceRuntime) -> [ReuseportSocket] {
        let endpoints = service.listeners.filter { $0.transport == .udp }
        var copies: [ReuseportSocket] = []
        for fd in Syscall.socketDescriptors(of: pid) where copies.count < endpoints.count {
            guard let copy = try? Syscall.pidfdGetDescriptor(pidfd, fd) else { continue }
            let bound = try? Syscall.localAddress(copy.fd, "leaving worker's fd \(fd)")
            guard let endpoint = endpoints.first(where: { $0.address == bound }),
                  !copies.contains(where: { $0.endpoint == endpoint }),
                  let socket = try? ReuseportSocket(adopting: copy, expected: endpoint)
            else { continue }
            copies.append(socket)
        }
        if copies.count < endpoints.count {
            service.logger.warning(
                "leaving worker pid \(pid): \(copies.count) of its \(endpoints.count) UDP sockets could be copied out of it; the others close with it")
        }
        return copies
    }
}
