#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportControl
import ReuseportKit
import SystemPackage

/// The daemon's end of the workers' `NOTIFY_SOCKET` (sd_notify(3)): a Unix datagram socket at
/// `<run-dir>/notify.sock`, mode 0666 so that workers running as another user can send to it
/// (the run folder lets everyone through: `ControlServer.runDirectoryMode`).
/// Who sent a datagram is what the kernel says (SO_PASSCRED → SCM_CREDENTIALS, which an
/// unprivileged sender cannot forge: net/core/scm.c, scm_check_creds()); the supervisor takes
/// only its workers' word. Read from the daemon's event loop, non-blocking, a bounded number
/// of datagrams per round.
final class NotifySocket {
    static let name = "notify.sock"
    /// The longest notification read; longer ones are ignored. systemd's limit too
    /// (NOTIFY_BUFFER_MAX, src/core/manager.c).
    static let maximumBytes = 4096
    /// The most datagrams read in one loop round: a worker that floods the socket does not
    /// keep the loop from the others (the rest wait in the socket's queue).
    static let datagramsPerRound = 64

    let path: String
    let descriptor: OwnedDescriptor
    private(set) var ignored = IgnoredNotifications()
    private var buffer = [UInt8](repeating: 0, count: NotifySocket.maximumBytes + 1)

    /// Binds `<runDirectory>/notify.sock` (replacing a stale one: ControlServer has checked
    /// that no other daemon runs there).
    init(runDirectory: String) throws {
        path = "\(runDirectory)/\(NotifySocket.name)"
        unlink(path)
        descriptor = try Syscall.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), nonBlocking: true, "AF_UNIX, SOCK_DGRAM")
        do {
            try Syscall.setOption(descriptor.fd, SOL_SOCKET, SO_PASSCRED, Int32(1), "SO_PASSCRED")
            try Syscall.bind(descriptor.fd, unixPath: path)
            // Sending to a Unix socket needs write permission on its file (unix(7)).
            try Syscall.retrying("chmod(\(path))") { chmod(path, 0o666) }
        } catch {
            descriptor.close()
            unlink(path)
            throw error
        }
    }

    /// Reads up to `datagramsPerRound` notifications and hands each well-formed one to `deliver`
    /// with its sender's pid; `deliver` returns false when the sender is not a worker. Whatever
    /// is ignored is counted, never thrown: a sender cannot stop the daemon.
    func receive(logger: Logger, _ deliver: (NotifyMessage, pid_t) -> Bool) {
        for _ in 0..<NotifySocket.datagramsPerRound {
            let datagram: Syscall.CredentialedDatagram
            do {
                guard let received = try Syscall.receiveWithCredentials(descriptor.fd, into: &buffer) else { return }
                datagram = received
            } catch {
                logger.warning("notify socket: \(error)")
                return
            }
            guard datagram.length <= NotifySocket.maximumBytes else {
                ignored.oversized += 1
                logger.debug("notify socket: ignored a datagram of \(datagram.length) bytes from pid \(datagram.pid ?? 0)")
                continue
            }
            guard let message = NotifyMessage(parsing: buffer[0..<datagram.length]) else {
                ignored.malformed += 1
                logger.debug("notify socket: ignored a malformed datagram from pid \(datagram.pid ?? 0)")
                continue
            }
            guard let pid = datagram.pid, deliver(message, pid) else {
                ignored.notWorker += 1
                logger.debug("notify socket: ignored a datagram from pid \(datagram.pid ?? 0), not a worker")
                continue
            }
        }
    }

    func close() {
        descriptor.close()
        unlink(path)
    }
}

/// One sd_notify(3) datagram: newline-separated `KEY=VALUE` assignments in UTF-8. The keys the
/// daemon acts on are kept; other well-formed ones (`MAINPID=`, `ERRNO=`, …) are accepted and
/// ignored, as systemd does with keys it does not know.
struct NotifyMessage: Equatable {
    /// `READY=1`: recorded per slot (readiness itself is still `ready_after_ms`).
    var ready = false
    /// `WATCHDOG=1`: the worker is alive; its watchdog deadline starts again.
    var watchdog = false
    /// `WATCHDOG=trigger`: the worker asks to be treated as if its watchdog expired.
    var watchdogTrigger = false
    /// `STATUS=…`: a line of free text, shown in `status`.
    var status: String?

    /// nil when the datagram is not a notification: empty, not UTF-8, a NUL byte, or a line
    /// that is not `KEY=VALUE` with a key of upper-case letters, digits and `_`.
    init?(parsing bytes: ArraySlice<UInt8>) {
        guard !bytes.isEmpty, !bytes.contains(0), let text = String(validating: bytes, as: UTF8.self) else { return nil }
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            guard let equals = line.firstIndex(of: "="), equals != line.startIndex else { return nil }
            let key = line[..<equals]
            guard key.utf8.allSatisfy({ (0x41...0x5a).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5f })
            else { return nil }
            let value = line[line.index(after: equals)...]
            switch key {
            case "READY": ready = ready || value == "1"
            case "WATCHDOG":
                watchdog = watchdog || value == "1"
                watchdogTrigger = watchdogTrigger || value == "trigger"
            case "STATUS": status = String(value)
            default: break
            }
        }
    }
}
