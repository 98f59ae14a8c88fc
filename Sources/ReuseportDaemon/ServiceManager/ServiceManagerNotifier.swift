#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// What the daemon tells the service manager that started it (systemd's `NOTIFY_SOCKET`, not the
/// workers' notify.sock), following sd_notify(3) and systemd.service(5) for `Type=notify-reload`:
///
/// - `READY=1` once, when every slot of every service has a running worker: `systemctl start`
///   returns only when every service answers on every slot.
/// - `RELOADING=1` with `MONOTONIC_USEC=` (CLOCK_MONOTONIC, which systemd compares with when it
///   asked for the reload) when a reload starts (SIGHUP or the control socket), then `READY=1`
///   when it is applied or refused: the unit goes back to active either way, and `STATUS=` says
///   which. A reload before the first `READY=1` sends neither: the start is still going on.
/// - `STOPPING=1` when SIGTERM or SIGINT starts the stop.
/// - `STATUS=` one line (`systemctl status` shows it): services, workers running of all slots,
///   the last event; sent when it changes.
/// - `WATCHDOG=1` every half of `WATCHDOG_USEC` (`WatchdogSec=`), from the event loop itself: a
///   loop that hangs stops the pings and systemd restarts the daemon.
///
/// Without `NOTIFY_SOCKET` nothing is sent. The variables stay in the daemon's environment: a
/// re-executed daemon needs them, and workers never see them (WorkerEnvironment builds theirs).
final class ServiceManagerNotifier {
    private let client: NotifyClient
    private let supervisor: Supervisor
    private(set) var sentReady = false
    private var sentStatus: String?
    /// When the next `WATCHDOG=1` is due (nil: no watchdog).
    private(set) var nextWatchdog: Int64?
    /// The longest `STATUS=` line; a longer last event is cut.
    static let maximumStatusBytes = 400

    init(supervisor: Supervisor, client: NotifyClient) {
        self.client = client
        self.supervisor = supervisor
        nextWatchdog = client.pingInterval.map { MonotonicClock.nanoseconds() + $0 }
    }

    var isActive: Bool { client.isConnected }

    /// Called once per round of the event loop: `READY=1` the first time every slot runs, and
    /// `STATUS=` when it changed.
    func update() {
        guard isActive else { return }
        let status = statusLine()
        if !sentReady, !supervisor.stopping, everySlotRunning {
            sentReady = true
            send(["READY=1"], status: status)
            supervisor.logger.notice("every worker is running: told the service manager READY=1")
        } else if status != sentStatus {
            send([], status: status)
        }
    }

    func reloading() {
        guard isActive, sentReady else { return }
        let now = MonotonicClock.nanoseconds()
        send(["RELOADING=1", "MONOTONIC_USEC=\(now / 1000)"], status: "reloading the configuration")
    }

    /// After a reload was applied or refused (the last event says which).
    func reloaded() {
        guard isActive, sentReady else { return }
        send(["READY=1"], status: statusLine())
    }

    func stopping() {
        guard isActive else { return }
        send(["STOPPING=1"], status: statusLine())
    }

    /// Sends `WATCHDOG=1` when due.
    func fireWatchdog(now: Int64) {
        guard let due = nextWatchdog, due <= now, let interval = client.pingInterval else { return }
        client.notify("WATCHDOG=1")
        nextWatchdog = now + interval
    }

    /// "1 service, 4/4 workers running; last: reloaded: no change".
    func statusLine() -> String {
        let services = supervisor.services
        let slots = services.flatMap(\.slots)
        let running = slots.filter { $0.state == .running }.count
        var line = "\(services.count) service\(services.count == 1 ? "" : "s"), "
        if supervisor.stopping {
            let left = supervisor.table.pids.count
            line += "stopping, \(left) worker\(left == 1 ? "" : "s") left"
        } else {
            line += "\(running)/\(slots.count) workers running"
        }
        if let event = supervisor.lastEvent {
            line += "; last: " + event.map { $0.isNewline ? " " : $0 }.reduce(into: "") { $0.append($1) }
        }
        guard line.utf8.count > ServiceManagerNotifier.maximumStatusBytes else { return line }
        return String(decoding: line.utf8.prefix(ServiceManagerNotifier.maximumStatusBytes - 3), as: UTF8.self) + "..."
    }

    private var everySlotRunning: Bool {
        supervisor.services.allSatisfy { $0.slots.allSatisfy { $0.state == .running || $0.state == .stalled } }
    }

    private func send(_ assignments: [String], status: String) {
        sentStatus = status
        client.notify((assignments + ["STATUS=\(status)"]).joined(separator: "\n"))
    }
}
