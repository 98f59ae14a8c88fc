#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import SystemPackage

/// The calls that let a daemon take over workers it did not start (or started before an exec):
/// a process named in a way pid reuse cannot fool, and descriptors copied out of it.
extension Syscall {
    /// pidfd_getfd(2) (Linux 5.6): a close-on-exec copy of `fd` in the process behind `pidfd`.
    public static func pidfdGetDescriptor(_ pidfd: OwnedDescriptor, _ fd: Int32) throws -> OwnedDescriptor {
        let copy = try pidfd.withFD { pidfd in
            try retrying("pidfd_getfd(\(fd))") { rpd_pidfd_getfd(pidfd, fd) }
        }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: copy))
    }

    /// membarrier(2) MEMBARRIER_CMD_GLOBAL: waits for an RCU grace period, after which every
    /// socket lookup begun before the call has delivered its packet. On a nohz_full kernel
    /// (EINVAL) it waits 100 ms instead, many grace periods.
    public static func waitForInFlightLookups() {
        if rpd_membarrier_global() != 0 { usleep(100_000) }
    }

    /// pidfd_send_signal(2): `signal` to exactly the process `pidfd` names.
    public static func pidfdSignal(_ pidfd: OwnedDescriptor, _ signal: Int32) throws {
        try pidfd.withFD { pidfd in
            _ = try retrying("pidfd_send_signal(\(signal))") { rpd_pidfd_send_signal(pidfd, signal) }
        }
    }

    /// The start time of process `pid`, in clock ticks after boot: field 22 of /proc/<pid>/stat
    /// (proc(5)). Together with the pid it names one process for as long as the system runs.
    /// nil for a process that has exited but is not yet reaped (a zombie: state Z or X).
    public static func processStartTime(_ pid: pid_t) throws -> UInt64? {
        // Fields 3… : the state is the first of them, the start time the 20th.
        let fields = try statFields(pid)
        guard fields.count >= 20, let ticks = UInt64(fields[19]) else {
            throw ReuseportError.invalidArgument("/proc/\(pid)/stat: no start time in field 22")
        }
        return fields[0] == "Z" || fields[0] == "X" ? nil : ticks
    }

    /// The processes of process group `group` that have not exited (/proc/<pid>/stat: field 3 the
    /// state, field 5 the group). kill(2) to the group counts its zombies too, and a zombie that is
    /// not this process's child is reaped only when init gets to it: in some containers, never.
    public static func liveMembers(ofProcessGroup group: pid_t) -> [pid_t] {
        directoryEntries("/proc").compactMap(pid_t.init).filter { pid in
            guard let fields = try? statFields(pid) else { return false }
            return fields.count > 2 && fields[0] != "Z" && fields[0] != "X" && pid_t(fields[2]) == group
        }
    }

    /// Fields 3… of /proc/<pid>/stat (proc(5)), read after the last ')': the command name in
    /// field 2 may hold spaces and parentheses.
    static func statFields(_ pid: pid_t) throws -> [Substring] {
        let text = String(decoding: try readFile("/proc/\(pid)/stat"), as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else {
            throw ReuseportError.invalidArgument("/proc/\(pid)/stat: no ')' after the command name")
        }
        return Array(text[text.index(after: close)...].split(separator: " "))
    }

    /// The descriptors of process `pid` that are sockets (/proc/<pid>/fd entries that read
    /// "socket:[inode]"), in ascending order; empty when they cannot be read.
    public static func socketDescriptors(of pid: pid_t) -> [Int32] {
        directoryEntries("/proc/\(pid)/fd").compactMap(Int32.init).sorted().filter { fd in
            (try? linkTarget("/proc/\(pid)/fd/\(fd)"))?.hasPrefix("socket:") == true
        }
    }
}

/// The calls of a daemon that execs itself in place (same pid, same children).
extension Syscall {
    /// fcntl(F_SETFD): whether `fd` is closed by execve(2).
    public static func setCloseOnExec(_ fd: FileDescriptor, _ on: Bool) throws {
        _ = try retrying("fcntl(F_SETFD, fd \(fd.rawValue))") { fcntl(fd.rawValue, F_SETFD, on ? FD_CLOEXEC : 0) }
    }

    /// execve(2): replaces this process's program; returns only by throwing. Blocked signals
    /// stay blocked and pending ones pending (a SIGCHLD is not lost), children stay children.
    public static func execute(_ path: String, arguments: [String], environment: [String]) throws -> Never {
        let argv = CStringArray(arguments)
        let envp = CStringArray(environment)
        execve(path, argv.pointers, envp.pointers)
        let code = errno
        argv.free()
        envp.free()
        throw ReuseportError.system("execve(\(path))", code)
    }
}
