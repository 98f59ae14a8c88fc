#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess
import SystemPackage

/// Starts a process with posix_spawn(3): the one place the project creates processes.
///
/// posix_spawn rather than fork: a forked child of a Swift process may only call
/// async-signal-safe functions. The child gets exactly the descriptors the file actions
/// give it (everything the system layer opens is close-on-exec).
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
    /// The child starts with no signal blocked and every signal at its default action
    /// (a daemon that blocks signals for a signalfd must not pass that on).
    public var resetSignals = false

    public init(path: String, arguments: [String], environment: [String]? = nil, fileActions: [FileAction] = [],
                newProcessGroup: Bool = false, resetSignals: Bool = false) {
        self.path = path
        self.arguments = arguments
        self.environment = environment
        self.fileActions = fileActions
        self.newProcessGroup = newProcessGroup
        self.resetSignals = resetSignals
    }

    /// `path` with `arguments` after argv[0] = `path`.
    public init(_ path: String, _ arguments: [String], environment: [String]? = nil, fileActions: [FileAction] = []) {
        self.init(path: path, arguments: [path] + arguments, environment: environment, fileActions: fileActions)
    }

    /// Starts the process and returns its pid. The caller reaps it (`Syscall.wait`).
    public func start() throws -> pid_t {
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
        if newProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))

        let argv = CStringArray(arguments)
        let envp = environment.map(CStringArray.init)
        defer {
            argv.free()
            envp?.free()
        }
        var pid: pid_t = 0
        let result = if let envp {
            posix_spawn(&pid, path, &actions, &attributes, argv.pointers, envp.pointers)
        } else {
            posix_spawn(&pid, path, &actions, &attributes, argv.pointers, environ)
        }
        try Syscall.checking("posix_spawn(\(path))", result)
        return pid
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
