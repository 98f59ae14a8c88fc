#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A TCP listener that closes with connections in its accept queue: on Linux 5.14+ the program
/// (rp_dispatch_migrate) moves each to a live slot instead of the kernel resetting it. Written
/// once, run by a `@Test` and by kernel-check on every kernel of the VM matrix.
public enum MigrationScenario {
    /// `clients` connect to a service of 2 slots and wait, unaccepted, in the listeners' accept
    /// queues; slot 1 closes (`closeSlot`: out of the fallback table, out of the array, closed).
    /// With migration every connection is then accepted from slot 0's listener and counted as
    /// migrated; without it (before 5.14) the scenario says what the kernel does instead.
    @discardableResult
    public static func run(_ plane: ServiceDataPlane, clients: [FlowClient]) throws -> String {
        let destination = plane.listeners[0].endpoint.address
        for client in clients { try client.connect(to: destination) }
        let queued = { (slot: UInt32) in (try? Syscall.acceptQueueLength(plane.listeners[0].sockets[slot]!.fd)) ?? 0 }
        let deadline = MonotonicClock.nanoseconds() + 2_000_000_000
        while queued(0) + queued(1) < clients.count, MonotonicClock.nanoseconds() < deadline { usleep(1000) }
        let onClosing = queued(1)
        try require(queued(0) + onClosing == clients.count,
                    "\(queued(0) + onClosing) of \(clients.count) connections reached an accept queue")
        try require(onClosing > 0, "no connection waits at slot 1: the scenario proves nothing")
        guard plane.listeners[0].program.migrates else {
            try plane.closeSlot(1)
            return "this kernel has no SELECT_OR_MIGRATE (5.14): the \(onClosing) connections queued at a closing "
                + "listener are reset, so a leaving TCP slot closes only once its accept queue stayed empty"
        }
        try plane.closeSlot(1)
        var accepted = 0
        let listener = plane.listeners[0].sockets[0]!.fd
        while accepted < clients.count, MonotonicClock.nanoseconds() < deadline + 2_000_000_000 {
            if let connection = try Syscall.accept(listener) {
                connection.descriptor.close()
                accepted += 1
            } else {
                usleep(1000)
            }
        }
        let counters = try plane.maps.globalCounters()
        try require(accepted == clients.count, "slot 0 accepted \(accepted) of \(clients.count) connections")
        try require(counters.migrated == UInt64(onClosing) && counters.migrate_failed == 0,
                    "migrated \(counters.migrated), failed \(counters.migrate_failed); \(onClosing) were queued at slot 1")
        return "\(onClosing) connections queued at a closing listener migrated to slot 0 and accepted there"
    }
}
