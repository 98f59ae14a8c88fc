#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// Everything one worker start spawned: the worker and whatever it forks, tracked the way
/// systemd tracks a service, so that all of it stops together when the worker exits, is
/// restarted, is scaled away or the daemon stops. A helper left behind would keep the
/// slot's socket (it inherited fd 3) and read datagrams beside the replacement.
///
/// - With cgroup v2, each worker start gets a cgroup of its own (`WorkerCgroups`): the
///   worker joins it before it execs the program, everything it forks stays in it, even
///   what calls setsid(), and `cgroup.kill` (5.14+) or a SIGKILL to each member stops it all.
/// - Without, the worker's process group: it leads one (and a session of its own), and its
///   children stay in it unless they call setsid() or setpgid(). Being in its own session, no
///   process of another worker can join it.
/// The daemon is a child subreaper (`Syscall.becomeChildSubreaper`): orphans of a worker are
/// re-parented to it, so it reaps them and nothing is left to init.
final class WorkerProcesses {
    /// The worker's pid, which leads its process group.
    let leader: pid_t
    /// The worker's cgroup folder, when cgroup v2 is used.
    let cgroup: String?
    /// The service, slot and generation it was started (or adopted) for: it keeps them after it
    /// leaves its slot, while it drains or stops, so that `status` still names it.
    var origin: WorkerOrigin
    private(set) var leaderExited = false

    init(leader: pid_t, cgroup: String?, origin: WorkerOrigin) {
        self.leader = leader
        self.cgroup = cgroup
        self.origin = origin
    }

    /// The pids in the worker's cgroup now (empty without one).
    var members: [pid_t] {
        guard let cgroup, let bytes = try? Syscall.readFile("\(cgroup)/cgroup.procs") else { return [] }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { pid_t($0) }
    }

    /// No process of this worker is left (zombies reaped: the daemon is their parent or reaper).
    var isEmpty: Bool {
        if cgroup != nil { return members.isEmpty }
        // kill(2) with signal 0 to the group: ESRCH once no process of it is left. It counts
        // zombies too: an adopted worker's (not this daemon's child) stays one until init reaps it,
        // which some containers' init never does, so a group that answers is read from /proc.
        return (try? Syscall.kill(-leader, 0)) == nil || Syscall.liveMembers(ofProcessGroup: leader).isEmpty
    }

    func leaderDidExit() { leaderExited = true }

    /// Sends `signal` to every process of the worker. SIGKILL with cgroup v2 goes through
    /// cgroup.kill where the kernel has it: one write, and no fork can race it.
    func signalAll(_ signal: Int32) {
        if let cgroup {
            if signal == SIGKILL, (try? Syscall.writeFile("\(cgroup)/cgroup.kill", Array("1".utf8))) != nil { return }
            for pid in members { try? Syscall.kill(pid, signal) }
        }
        try? Syscall.kill(-leader, signal)
    }

    /// Removes the cgroup folder once the worker is gone; false while it still has members.
    func release() -> Bool {
        guard isEmpty else { return false }
        if let cgroup { _ = try? Syscall.removeDirectory(cgroup) }
        return true
    }
}

/// Where a worker start belongs.
struct WorkerOrigin {
    var service: String
    var slot: UInt32
    var generation: UInt32
    /// Clock ticks after boot (/proc/<pid>/stat field 22): with the pid, it names the process.
    var startTime: UInt64
}

/// The folder under which workers' cgroups are made: `reuseportd-<pid>` inside the daemon's
/// own cgroup v2 (under systemd, the unit's cgroup: it needs `Delegate=yes`). Nil when there
/// is no cgroup v2 or it is not writable; the daemon then falls back to process groups.
struct WorkerCgroups {
    let root: String
    /// Whether workers are created inside their cgroup (clone3 CLONE_INTO_CGROUP, Linux 5.7)
    /// or join it themselves; nil until the first worker start finds out.
    var createsInside: Bool?

    /// Finds the daemon's cgroup v2 folder and makes `reuseportd-<pid>` in it, or says why not.
    static func make(logger: Logger) -> WorkerCgroups? {
        guard let mount = cgroup2Mount() else {
            logger.notice("no cgroup v2 mounted: workers are tracked by process group (children that call setsid() escape)")
            return nil
        }
        guard let own = ownCgroup() else {
            logger.notice("no cgroup v2 path in /proc/self/cgroup: workers are tracked by process group")
            return nil
        }
        let parent = own == "/" ? mount : mount + own
        removeStale(in: parent)
        let root = "\(parent)/reuseportd-\(getpid())"
        do {
            try Syscall.makeDirectory(root)
        } catch {
            logger.notice("cannot make a cgroup for the workers (\(error)): workers are tracked by process group")
            return nil
        }
        logger.info("workers' cgroups under \(root)")
        return WorkerCgroups(root: root, createsInside: nil)
    }

    /// The highest worker-start number among the folders already there (`<service>.<slot>.<n>`).
    var lastSequence: Int {
        Syscall.directoryEntries(root).compactMap { $0.split(separator: ".").last.flatMap { Int($0) } }.max() ?? 0
    }

    /// A new, empty cgroup for one worker start.
    func make(service: String, slot: UInt32, sequence: Int) throws -> String {
        let path = "\(root)/\(service).\(slot).\(sequence)"
        try Syscall.makeDirectory(path)
        return path
    }

    /// Removes the (empty) folders left by this daemon. rmdir(2) refuses the cgroup's files
    /// (and any folder that still has a process), so every entry is simply tried.
    func remove() {
        for child in Syscall.directoryEntries(root) { _ = try? Syscall.removeDirectory("\(root)/\(child)") }
        _ = try? Syscall.removeDirectory(root)
    }

    /// The mount point of cgroup v2, from /proc/self/mountinfo ("... MOUNTPOINT ... - cgroup2 ...").
    static func cgroup2Mount() -> String? {
        guard let bytes = try? Syscall.readFile("/proc/self/mountinfo") else { return nil }
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2, halves[1].hasPrefix("cgroup2 ") else { continue }
            let fields = halves[0].split(separator: " ")
            if fields.count > 4 { return String(fields[4]) }
        }
        return nil
    }

    /// The cgroup folder of an adopted worker, if it is a worker start's (in a `reuseportd-<pid>`
    /// folder, this daemon's or a previous one's): everything it forked is tracked with it again.
    static func cgroup(of pid: pid_t) -> String? {
        guard let mount = cgroup2Mount(), let path = ownCgroup(process: "\(pid)") else { return nil }
        let folder = mount + path
        let parent = folder.split(separator: "/").dropLast().last ?? ""
        return parent.hasPrefix("reuseportd-") ? folder : nil
    }

    /// The mount point of cgroup v2, read once: it does not move while the daemon runs.
    static let mountPoint = cgroup2Mount()

    /// The cgroup folder `pid` is in now, as the daemon names its workers' (mount point and path):
    /// nil without cgroup v2 or for a process that is gone.
    static func cgroup(ofProcess pid: pid_t) -> String? {
        guard let mount = mountPoint, let path = ownCgroup(process: "\(pid)") else { return nil }
        return path == "/" ? mount : mount + path
    }

    /// A process's cgroup v2 path, from /proc/<process>/cgroup ("0::/PATH").
    static func ownCgroup(process: String = "self") -> String? {
        guard let bytes = try? Syscall.readFile("/proc/\(process)/cgroup") else { return nil }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n")
            .first { $0.hasPrefix("0::") }.map { String($0.dropFirst(3)) }
    }

    /// `reuseportd-<pid>` folders of daemons that are gone (killed before they could clean up):
    /// their empty worker folders and themselves. A folder with a live member stays.
    static func removeStale(in parent: String) {
        for name in Syscall.directoryEntries(parent) where name.hasPrefix("reuseportd-") {
            guard let pid = pid_t(name.dropFirst("reuseportd-".count)), pid != getpid(),
                  (try? Syscall.kill(pid, 0)) == nil else { continue }
            for child in Syscall.directoryEntries("\(parent)/\(name)") { _ = try? Syscall.removeDirectory("\(parent)/\(name)/\(child)") }
            _ = try? Syscall.removeDirectory("\(parent)/\(name)")
        }
    }
}
