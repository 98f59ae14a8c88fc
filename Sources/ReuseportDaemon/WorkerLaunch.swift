#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess

/// Starting a worker, in two steps.
///
/// 1. The daemon posix_spawn()s its own binary as `reuseportd exec-worker`, with the slot's
///    sockets dup'ed onto fd 3…, /dev/null on stdin, a pipe on stdout and stderr, signals
///    unblocked and at their defaults, in a process group of its own.
/// 2. That process (`WorkerExec`) drops to the configured user and group, asks the kernel
///    for SIGKILL when the daemon dies, sets `LISTEN_PID` to its own pid (which only the
///    child can know before exec) and execs the configured program, or runs the built-in
///    worker in place.
///
/// posix_spawn rather than fork: a forked child of a Swift process may only call
/// async-signal-safe functions, and the whole setup above is easier to get right once
/// the child is a fresh process.
public struct WorkerSpawn {
    public var executable: String
    public var arguments: [String]
    public var environment: [String]
    /// Become fd 3, 4, … in the child, in this order.
    public var sockets: [Int32]
    /// Becomes the child's stdout and stderr.
    public var output: Int32

    /// Starts the process and returns its pid.
    public func start() throws(WorkerError) -> pid_t {
        // Move the sockets above the target range first, so that dup2(source, 3 + i) never
        // overwrites a source still to be copied (a socket may itself be fd 3 or 4).
        var staged: [Int32] = []
        defer { for fd in staged { close(fd) } }
        for socket in sockets {
            // Blocking, as systemd passes sockets: a previous worker may have made the shared
            // file description non-blocking, and the next program may not expect that.
            _ = fcntl(socket, F_SETFL, fcntl(socket, F_GETFL) & ~O_NONBLOCK)
            let copy = fcntl(socket, F_DUPFD_CLOEXEC, ActivationEnvironment.firstDescriptor + Int32(sockets.count))
            guard copy >= 0 else { throw WorkerError.system("fcntl(F_DUPFD_CLOEXEC, fd \(socket))") }
            staged.append(copy)
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, output, 1)
        posix_spawn_file_actions_adddup2(&actions, output, 2)
        for (index, fd) in staged.enumerated() {
            posix_spawn_file_actions_adddup2(&actions, fd, ActivationEnvironment.firstDescriptor + Int32(index))
        }
        // Everything above the sockets goes, including fds the daemon inherited without
        // close-on-exec from whoever started it.
        let closing = rpd_spawn_close_from(&actions, ActivationEnvironment.firstDescriptor + Int32(sockets.count))
        guard closing == 0 else { throw WorkerError("posix_spawn_file_actions_addclosefrom_np: \(String(cString: strerror(closing)))") }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))

        let argv = CStringArray(arguments)
        let envp = CStringArray(environment)
        defer {
            argv.free()
            envp.free()
        }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, executable, &actions, &attributes, argv.pointers, envp.pointers)
        guard result == 0 else {
            throw WorkerError("posix_spawn(\(executable)): \(String(cString: strerror(result)))")
        }
        return pid
    }
}

/// A NULL-terminated array of C strings, freed explicitly.
struct CStringArray {
    let pointers: [UnsafeMutablePointer<CChar>?]

    init(_ strings: [String]) { pointers = strings.map { strdup($0) } + [nil] }

    func free() { for pointer in pointers { Glibc.free(pointer) } }
}

/// The child side of a worker start: runs as `reuseportd exec-worker`.
public struct WorkerExec {
    public var parent: pid_t
    public var user: String?
    public var group: String?
    public var program: WorkerProgram

    public init(parent: pid_t, user: String?, group: String?, program: WorkerProgram) {
        self.parent = parent
        self.user = user
        self.group = group
        self.program = program
    }

    /// Becomes the worker; returns only by throwing.
    public func run() throws(WorkerError) -> Never {
        switch UserIdentity.resolve(user: user, group: group).flatMap({ $0.apply() }) {
        case .success: break
        case .failure(let error): throw WorkerError("cannot run as user \(user ?? "-") group \(group ?? "-"): \(error)")
        }
        // After the credential change (it clears the setting), and then check that the daemon
        // did not die before it was set: the signal would never come.
        guard rpd_set_parent_death_signal(SIGKILL) == 0 else { throw WorkerError.system("prctl(PR_SET_PDEATHSIG)") }
        guard getppid() == parent else { throw WorkerError("the daemon (pid \(parent)) is gone; not starting") }
        setenv(ActivationEnvironment.listenPID, String(getpid()), 1)
        switch program {
        case .builtin(let kind):
            try BuiltinWorker(kind: kind, sockets: ActivatedSockets.fromEnvironment()).run()
        case .exec(let argv):
            let arguments = CStringArray(argv)
            execvp(argv[0], arguments.pointers)
            let code = errno
            arguments.free()
            throw WorkerError("exec \(argv[0]): \(String(cString: strerror(code)))")
        }
    }
}
