#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import SystemPackage

/// Starts a process with posix_spawn(3), or inside a cgroup with clone3(2): the one place the
/// project creates processes.
///
/// posix_spawn rather than fork: a forked child of a Swift process may only call
/// async-signal-safe functions. The child gets exactly the descriptors the file actions
/// give it (everything the system layer opens is close-on-exec). With `cgroup`, the child is
/// made by clone3(CLONE_INTO_CGROUP) in C (`rpd_spawn_into_cgroup`), whose child makes only
/// async-signal-safe calls and follows the same file actions and attributes.
public struct ProcessSpawn {
    /// What the child does with its descriptors before exec, in order.
    public enum FileAction: Sendable {
        /// open(path, flags, mode) as descriptor `target`.
        case open(Int32, path: String, flags: Int32, mode: mode_t = 0)
        /// dup2(source, target): the copy has no close-on-exec, so the program keeps it.
        case duplicate(Int32, to: Int32)
        /// close(fd).
        case close(Int32)
        /// Closes every descriptor from `lowest` up (posix_spawn_file_actions_addclosefrom_np,
        /// glibc 2.34), including those inherited without close-on-exec.
        case closeFrom(Int32)

        /// stdin from /dev/null.
        public static let nullInput = FileAction.open(0, path: "/dev/null", flags: O_RDONLY)
    }

    /// The program; `arguments[0]` is its argv[0].
    public var path: String
    public var arguments: [String]
    /// "NAME=value" entries; nil inherits this process's environment.
    public var environment: [String]?
    public var fileActions: [FileAction]
    /// The child leads a process group of its own (so that kill(-pid) reaches its children).
    public var newProcessGroup = false
    /// The child leads a session of its own (setsid()), and so a process group of its own too
    /// (`newProcessGroup` is then implied). A process can join only a process group of its own
    /// session (setpgid(2), EPERM): nothing of another session can join the child's group.
    public var newSession = false
    /// The child starts with no signal blocked and every signal at its default action
    /// (a daemon that blocks signals for a signalfd must not pass that on).
    public var resetSignals = false
    /// A cgroup v2 folder (an O_PATH or O_RDONLY descriptor) the child is created in, with
    /// clone3(CLONE_INTO_CGROUP) (Linux 5.7) instead of posix_spawn. The child is never in this
    /// process's cgroup, and the kernel takes the cgroup threadgroup rwsem only for reading,
    /// where writing a pid to cgroup.procs takes it for writing and waits for an RCU grace
    /// period (kernel/cgroup/cgroup.c, cgroup_css_set_fork() and cgroup_procs_write_start()):
    /// milliseconds per start. Older kernels throw an error for which `cgroupSpawnUnsupported`
    /// is true. (glibc 2.39 has this as posix_spawnattr_setcgroup_np.)
    public var cgroup: FileDescriptor?

    public init(path: String, arguments: [String], environment: [String]? = nil, fileActions: [FileAction] = [],
                newProcessGroup: Bool = false, newSession: Bool = false, resetSignals: Bool = false,
                cgroup: FileDescriptor? = nil) {
        self.path = path
        self.arguments = arguments
        self.environment = environment
        self.fileActions = fileActions
        self.newProcessGroup = newProcessGroup
        self.newSession = newSession
        self.resetSignals = resetSignals
        self.cgroup = cgroup
    }

    /// `path` with `arguments` after argv[0] = `path`.
    public init(_ path: String, _ arguments: [String], environment: [String]? = nil, fileActions: [FileAction] = []) {
        self.init(path: path, arguments: [path] + arguments, environment: environment, fileActions: fileActions)
    }

    /// Starts the process and returns its pid. The caller reaps it (`Syscall.wait`).
    public func start() throws -> pid_t {
        if let cgroup { return try start(inside: cgroup) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for action in fileActions {
            switch action {
            case .open(let target, let path, let flags, let mode):
                try Syscall.checking("posix_spawn_file_actions_addopen(\(path))",
                                     posix_spawn_file_actions_addopen(&actions, target, path, flags, mode))
            case .duplicate(let source, let target):
                try Syscall.checking("posix_spawn_file_actions_adddup2(\(source), \(target))",
                                     posix_spawn_file_actions_adddup2(&actions, source, target))
            case .close(let fd):
                try Syscall.checking("posix_spawn_file_actions_addclose(\(fd))",
                                     posix_spawn_file_actions_addclose(&actions, fd))
            case .closeFrom(let lowest):
                try Syscall.checking("posix_spawn_file_actions_addclosefrom_np", rpd_spawn_close_from(&actions, lowest))
            }
        }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var flags: Int32 = 0
        if resetSignals {
            var empty = sigset_t()
            sigemptyset(&empty)
            var all = sigset_t()
            sigfillset(&all)
            posix_spawnattr_setsigmask(&attributes, &empty)
            posix_spawnattr_setsigdefault(&attributes, &all)
            flags |= Int32(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
        }
        if newSession {
            // Not with POSIX_SPAWN_SETPGROUP: setpgid() of a session leader fails (EPERM).
            flags |= Int32(rpd_posix_spawn_setsid)
        } else if newProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))

        var pid: pid_t = 0
        let result = withArgumentsAndEnvironment { argv, envp in
            posix_spawn(&pid, path, &actions, &attributes, argv, envp)
        }
        try Syscall.checking("posix_spawn(\(path))", result)
        return pid
    }

    /// True for the error `start()` throws with `cgroup` on a kernel without
    /// clone3(CLONE_INTO_CGROUP): ENOSYS (no clone3, before 5.3, or a seccomp filter that
    /// hides it), E2BIG (5.3, 5.4: struct clone_args too long), EINVAL (5.5, 5.6: unknown flag).
    /// The caller then starts without `cgroup`, and the child joins the cgroup itself.
    public static func cgroupSpawnUnsupported(_ error: Error) -> Bool {
        guard case .system(let call, let code, _) = error as? ReuseportError else { return false }
        return call == cloneCall && [ENOSYS, E2BIG, EINVAL].contains(code)
    }

    static let cloneCall = "clone3(CLONE_INTO_CGROUP)"

    private func start(inside cgroup: FileDescriptor) throws -> pid_t {
        // Made before clone3: the child may not allocate.
        let paths: [UnsafeMutablePointer<CChar>?] = fileActions.map {
            if case .open(_, let path, _, _) = $0 { return strdup(path) }
            return nil
        }
        defer { for path in paths { Glibc.free(path) } }
        let actions = zip(fileActions, paths).map { action, path in
            var raw = rpd_file_action()
            switch action {
            case .open(let target, _, let flags, let mode):
                raw.kind = Int32(RPD_FILE_OPEN.rawValue)
                (raw.fd, raw.flags, raw.mode, raw.path) = (target, flags, UInt32(mode), UnsafePointer(path))
            case .duplicate(let source, let target):
                (raw.kind, raw.source, raw.fd) = (Int32(RPD_FILE_DUPLICATE.rawValue), source, target)
            case .close(let fd):
                (raw.kind, raw.fd) = (Int32(RPD_FILE_CLOSE.rawValue), fd)
            case .closeFrom(let lowest):
                (raw.kind, raw.fd) = (Int32(RPD_FILE_CLOSE_FROM.rawValue), lowest)
            }
            return raw
        }
        var flags: Int32 = 0
        if newProcessGroup { flags |= Int32(RPD_SPAWN_NEW_PROCESS_GROUP.rawValue) }
        if newSession { flags |= Int32(RPD_SPAWN_NEW_SESSION.rawValue) }
        if resetSignals { flags |= Int32(RPD_SPAWN_RESET_SIGNALS.rawValue) }

        var step: Int32 = 0
        let pid = withArgumentsAndEnvironment { argv, envp in
            actions.withUnsafeBufferPointer {
                rpd_spawn_into_cgroup(cgroup.rawValue, path, argv, envp, $0.baseAddress, $0.count, flags, &step)
            }
        }
        if pid < 0 {
            let code = errno
            throw ReuseportError.system(failedCall(step), code)
        }
        return pid
    }

    /// `arguments` and `environment` (this process's when nil) as the NULL-terminated arrays
    /// of execve(2), valid during `body`.
    private func withArgumentsAndEnvironment<R>(
        _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>, UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R
    ) -> R {
        let argv = CStringArray(arguments)
        let envp = environment.map(CStringArray.init)
        defer {
            argv.free()
            envp?.free()
        }
        return argv.pointers.withUnsafeBufferPointer { argv in
            guard let envp else { return body(argv.baseAddress!, environ) }
            return envp.pointers.withUnsafeBufferPointer { body(argv.baseAddress!, $0.baseAddress!) }
        }
    }

    /// The call that `rpd_spawn_into_cgroup` reports failed.
    private func failedCall(_ step: Int32) -> String {
        switch Int(step) {
        case RPD_SPAWN_STEP_CLONE: return Self.cloneCall
        case RPD_SPAWN_STEP_EXEC: return "execve(\(path))"
        case RPD_SPAWN_STEP_SETPGID: return "setpgid(0, 0)"
        case RPD_SPAWN_STEP_SETSID: return "setsid()"
        case RPD_SPAWN_STEP_SIGNALS: return "sigprocmask"
        case RPD_SPAWN_STEP_REPORT: return "fcntl(F_DUPFD_CLOEXEC)"
        case let index where fileActions.indices.contains(index):
            switch fileActions[index] {
            case .open(let target, let path, _, _): return "open(\(path)) as fd \(target)"
            case .duplicate(let source, let target): return "dup2(\(source), \(target))"
            case .close(let fd): return "close(\(fd))"
            case .closeFrom(let lowest): return "close_range(\(lowest))"
            }
        default: return "clone3 child step \(step)"
        }
    }

    /// Starts the process, waits for it and returns how it ended.
    public func run() throws -> WaitStatus {
        let pid = try start()
        return try Syscall.wait(pid, block: true)!.status
    }
}

/// How a child ended, decoded from a waitpid(2) status.
public enum WaitStatus: Equatable, Sendable, CustomStringConvertible {
    case exited(Int32)
    case killed(signal: Int32)

    public init(raw: Int32) {
        // WIFEXITED/WEXITSTATUS/WTERMSIG are macros Swift cannot import (sys/wait.h).
        let signal = raw & 0x7f
        self = signal == 0 ? .exited((raw >> 8) & 0xff) : .killed(signal: signal)
    }

    /// As a shell reports it: the exit status, or 128 + the signal.
    public var shellStatus: Int32 {
        switch self {
        case .exited(let code): return code
        case .killed(let signal): return 128 + signal
        }
    }

    /// "exit 3", "signal 9".
    public var description: String {
        switch self {
        case .exited(let code): return "exit \(code)"
        case .killed(let signal): return "signal \(signal)"
        }
    }
}

/// A NULL-terminated array of C strings (argv, envp), freed explicitly.
public struct CStringArray {
    public let pointers: [UnsafeMutablePointer<CChar>?]

    public init(_ strings: [String]) { pointers = strings.map { strdup($0) } + [nil] }

    public func free() { for pointer in pointers { Glibc.free(pointer) } }
}
