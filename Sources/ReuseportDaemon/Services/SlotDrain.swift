#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A slot whose sockets still hold datagrams for its worker: removed by a scale-down, or
/// replaced when a reload rebuilt its service (`kind`).
///
/// Resizing moves the slot's buckets away and takes its sockets out of the arrays, so nothing
/// new is steered there; what was queued before stays in the sockets, and only the slot's
/// worker reads it (a worker started a moment ago may not have read anything yet). So the
/// daemon keeps its own copy of the sockets open and lets the worker run until every UDP
/// receive queue has been empty for 50 ms (SIOCINQ every 10 ms), and only then sends SIGTERM:
/// an empty queue does not say that the worker has answered the last datagram it read, so it
/// gets that long to do so (one datagram was lost in a trial under load with 10 ms).
/// At `stop_timeout_ms` after the scale, or when the worker dies first, what is still queued is
/// read off and counted (`removedSlotDrops`, logged).
///
/// The daemon's copies outlive the worker (the worker table keeps the ended drain until every
/// process of the worker is gone: `release`), so that each socket's last close is the daemon's,
/// after the socket left the port (ReuseportSocket.leavePort): a UDP socket's plain last close
/// can take datagrams the program steered to the remaining slots.
///
/// A TCP listener is waited for the same way, on its accept queue (TCP_INFO): the worker accepts
/// what completed its handshake before the listener left the array. Where the kernel migrates a
/// closing listener's requests (5.14, ReuseportMigration), a handshake still in flight when it
/// closes goes to a live slot; before 5.14 such a handshake (one that takes longer than the
/// 50 ms of empty queue) is reset.
///
/// A worker of an older generation with TCP listeners keeps the connections it accepted
/// (`holdWorkerUntil`): when its queues are done with, empty or at `stop_timeout_ms`, only the
/// daemon's copies close, and the worker runs on until it exits or the hold ends. A connection
/// still queued at `stop_timeout_ms` is one the worker no longer accepts (it may have closed its
/// listeners at `drain_signal`); it waits until the worker's copy closes too.
final class SlotDrain {
    let service: ServiceRuntime
    let slot: UInt32
    /// The daemon's copies, taken out of the data plane (ServiceDataPlane.resizeKeepingRemoved):
    /// the TCP listeners' until the worker is held (`holdWorkerUntil`), the rest until the worker
    /// is gone (`release`).
    private(set) var sockets: [ReuseportSocket]
    /// A slot of an older generation with TCP listeners: once its queues are empty, or at the
    /// deadline, its sockets close, but its worker is not stopped before this (the switch +
    /// `drain_timeout_ms`), so that the connections it accepted stay with it until it exits by
    /// itself (after `drain_signal`, say) or the drain timeout. Nil: stopped once the queues are
    /// empty, or at the deadline.
    var holdWorkerUntil: Int64?
    /// The queues are done with: the TCP listeners' copies were closed (the UDP sockets' wait for
    /// the worker to be gone) and the worker is held until `holdWorkerUntil`.
    var listenersReleased = false
    /// `stop_timeout_ms` after the scale: the queue is discarded and counted then (a held worker
    /// keeps running: only its sockets close).
    let deadline: Int64
    var nextCheck: Int64
    /// Checks in a row that found every queue empty.
    var emptyChecks = 0

    static let checkIntervalNs: Int64 = 10_000_000
    /// Checks in a row that must find every queue empty before the worker is stopped.
    static let emptyChecksBeforeStop = 5

    /// "removed" or "replaced": what the log calls the slot.
    let kind: String

    init(service: ServiceRuntime, slot: UInt32, sockets: [ReuseportSocket], deadline: Int64, now: Int64,
         kind: String = "removed") {
        self.kind = kind
        self.service = service
        self.slot = slot
        self.sockets = sockets
        self.deadline = deadline
        nextCheck = now
    }

    /// Whether a datagram waits in any of the slot's UDP sockets, or a connection in the accept
    /// queue of any of its TCP listeners.
    var hasQueued: Bool {
        sockets.contains { socket in
            switch socket.endpoint.transport {
            case .udp: return ((try? Syscall.queuedBytes(socket.fd)) ?? 0) > 0
            case .tcp: return ((try? Syscall.acceptQueueLength(socket.fd)) ?? 0) > 0
            }
        }
    }

    /// Connections waiting in the accept queues of the slot's TCP listeners.
    var queuedConnections: Int {
        sockets.filter { $0.endpoint.transport == .tcp }
            .reduce(0) { $0 + ((try? Syscall.acceptQueueLength($1.fd)) ?? 0) }
    }

    /// Closes the daemon's copies of the TCP listeners, so that each closes with the worker's
    /// copy (then the kernel migrates what waits in its queue, 5.14). The UDP sockets are kept
    /// until the worker is gone (`release`).
    func closeListeners() {
        for socket in sockets where socket.endpoint.transport == .tcp { socket.close() }
        sockets.removeAll { $0.endpoint.transport == .tcp }
    }

    /// Reads off and discards every queued datagram; returns how many.
    func discardQueued() -> Int {
        // Bounded (ReuseportSocket.discardQueued): nothing new is steered here, so this only
        // empties what was there.
        sockets.reduce(0) { $0 + $1.discardQueued() }
    }

    /// Once no process of the worker is left: each UDP socket leaves its port before its last
    /// close (ReuseportSocket.leavePort: a plain close may swallow datagrams the program steered
    /// to other slots), what it still holds is read off, and every socket closes. Returns how
    /// many datagrams were read off, and the sockets that could not leave their port first.
    func release() -> (discarded: Int, failures: [String]) {
        let (discarded, failures) = ReuseportSocket.leavePortAndClose(sockets)
        sockets = []
        return (discarded, failures.map { "\($0.socket): \($0.error)" })
    }
}

extension Supervisor {
    /// A drain check. The sockets are done with once the queues were empty long enough, or at
    /// the deadline (what is still queued is counted); then the worker is stopped, unless it
    /// holds its connections (`holdWorkerUntil`): then only the sockets close, and the worker is
    /// stopped when the hold ends.
    func checkDrain(_ pid: pid_t, now: Int64) {
        guard let drain = table.drain(of: pid) else { return }
        if drain.listenersReleased {
            guard let hold = drain.holdWorkerUntil, now < hold else {
                endDrain(pid, now: now, counting: false)
                return
            }
            // Checked again at least once a minute: the hold may have no end (Int64.max).
            drain.nextCheck = min(hold, now + 60_000_000_000)
            return
        }
        let timedOut: Bool
        if drain.hasQueued {
            drain.emptyChecks = 0
            timedOut = now >= drain.deadline
            guard timedOut else {
                drain.nextCheck = now + SlotDrain.checkIntervalNs
                return
            }
        } else {
            drain.emptyChecks += 1
            guard drain.emptyChecks >= SlotDrain.emptyChecksBeforeStop else {
                drain.nextCheck = now + SlotDrain.checkIntervalNs
                return
            }
            timedOut = false
        }
        let reason = "its worker did not read them within \(configuration.stopTimeoutMs) ms"
        guard let hold = drain.holdWorkerUntil, now < hold else {
            endDrain(pid, now: now, counting: timedOut, reason: reason)
            return
        }
        // The worker keeps the connections it accepted whether or not its accept queues emptied:
        // connections still queued at the deadline are ones it no longer accepts (a drain signal
        // makes many servers close their listeners: nginx at SIGQUIT), and stopping it for them
        // would end every connection it holds. Only the daemon's copies close: the listener
        // closes once the worker's copy does too, and then the kernel moves what waits in its
        // queue to a live slot (the migrate program, 5.14; before, those are reset).
        let waiting = drain.queuedConnections
        if timedOut { finish(drain, reason: reason) }
        drain.closeListeners()
        drain.listenersReleased = true
        let fate = ReuseportMigration.isSupported ? "go to a live slot" : "are reset"
        let waitingSentence = waiting > 0
            ? "; the \(waiting) connections it did not accept within \(configuration.stopTimeoutMs) ms \(fate) once its own copies of the listeners close"
            : ""
        drain.service.logger.info(
            "slot \(drain.slot): listeners closed; its worker keeps its connections until it exits, or for \((hold - now) / 1_000_000) ms\(waitingSentence)")
        drain.nextCheck = min(hold, now + 60_000_000_000)
    }

    /// Ends a drain: stops its worker unless it `exited` (reaped already), and counts what is
    /// still queued when `counting`. The daemon's copies of the sockets are released once no
    /// process of the worker is left (`releaseSockets`, from `forgetFinishedWorkers`): the
    /// socket's last close is then the daemon's, after it left the port.
    func endDrain(_ pid: pid_t, now: Int64, counting: Bool, reason: String = "", exited: Bool = false) {
        guard let drain = table.endDrain(pid) else { return }
        if counting { finish(drain, reason: reason) }
        if !exited { stopWorker(pid, now: now) }
    }

    /// Counts and logs what is still queued at a removed slot, and reads it off.
    func finish(_ drain: SlotDrain, reason: String) {
        count(drain, dropped: drain.discardQueued(), reason: reason)
    }

    /// Releases the sockets of a drain whose worker is gone (SlotDrain.release), counting what
    /// they still held.
    func releaseSockets(_ drain: SlotDrain) {
        let (discarded, failures) = drain.release()
        for failure in failures {
            drain.service.logger.error("\(drain.kind) slot \(drain.slot): closed without leaving its port first: \(failure)")
        }
        count(drain, dropped: discarded, reason: "they reached its sockets after its worker stopped reading")
    }

    private func count(_ drain: SlotDrain, dropped: Int, reason: String) {
        guard dropped > 0 else { return }
        drain.service.removedSlotDrops += dropped
        drain.service.logger.warning(
            "\(drain.kind) slot \(drain.slot): \(dropped) queued datagrams dropped, \(reason) (\(drain.service.removedSlotDrops) so far)")
    }
}
