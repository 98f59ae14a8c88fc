#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import SystemPackage

/// Starting a worker, in two steps.
///
/// 1. The daemon spawns its own binary as `reuseportd exec-worker`, with the slot's
///    sockets dup'ed onto fd 3…, /dev/null on stdin, a pipe on stdout and stderr, signals
///    unblocked and at their defaults, in a session (and so a process group) of its own, and
///    created inside the worker's cgroup (clone3 CLONE_INTO_CGROUP; on kernels before 5.7 the
///    child joins it itself, `--cgroup`). The session is systemd's for a service too; here it
///    keeps workers apart where their process group is what identifies them (no cgroup v2,
///    `Supervisor.worker(of:)`): setpgid(2) joins only a group of the caller's own session, so
///    no process of one worker can move into the group another worker leads.
/// 2. That process (`WorkerExec`) drops to the configured user and group, ignores SIGPIPE,
///    sets `LISTEN_PID` (and `WATCHDOG_PID` with a watchdog)
///    to its own pid (which only the child can know before exec) and execs the configured program, or runs the built-in
///    worker in place.
public struct WorkerSpawn {
    public var executable: String
    public var arguments: [String]
    public var environment: [String]
    /// Become fd 3, 4, … in the child, in this order.
    public var sockets: [FileDescriptor]
    /// Becomes the child's stdout and stderr.
    public var output: FileDescriptor
    /// The worker's cgroup folder (an O_RDONLY descriptor), which the child is created in (`ProcessSpawn.cgroup`).
    public var cgroup: FileDescriptor?

    /// Starts the process and returns its pid.
    public func start() throws -> pid_t {
        let first = ActivationEnvironment.firstDescriptor
        // Move the sockets above the target range first, so that dup2(source, 3 + i) never
        // overwrites a source still to be copied (a socket may itself be fd 3 or 4). The
        // copies close when this returns.
        var staged: [OwnedDescriptor] = []
        for socket in sockets {
            // Blocking, as systemd passes sockets: a previous worker may have made the shared
            // file description non-blocking, and the next program may not expect that.
            try? Syscall.setNonBlocking(socket, false)
            staged.append(try Syscall.duplicate(socket, atLeast: first + Int32(sockets.count)))
        }
        var actions: [ProcessSpawn.FileAction] = [
            .nullInput, .duplicate(output.rawValue, to: 1), .duplicate(output.rawValue, to: 2),
        ]
        for (index, copy) in staged.enumerated() { actions.append(.duplicate(copy.fd.rawValue, to: first + Int32(index))) }
        // Everything above the sockets goes, including fds the daemon inherited without
        // close-on-exec from whoever started it.
        actions.append(.closeFrom(first + Int32(sockets.count)))
        return try withExtendedLifetime(staged) {
            try ProcessSpawn(path: executable, arguments: arguments, environment: environment, fileActions: actions,
                             newSession: true, resetSignals: true, cgroup: cgroup).start()
        }
    }
}

/// The child side of a worker start: runs as `reuseportd exec-worker`.
public struct WorkerExec {
    public var parent: pid_t
    public var user: String?
    public var group: String?
    public var program: WorkerProgram
    /// The cgroup v2 folder this worker start gets (see WorkerProcesses), joined before anything
    /// else. Only on kernels before 5.7: the daemon otherwise creates the process inside it.
    public var cgroup: String?

    public init(parent: pid_t, user: String?, group: String?, program: WorkerProgram, cgroup: String? = nil) {
        self.parent = parent
        self.user = user
        self.group = group
        self.program = program
        self.cgroup = cgroup
    }

    /// Becomes the worker; returns only by throwing (`WorkerError`, or `ReuseportError` for a failed call).
    public func run() throws -> Never {
        // Still root: join the worker's cgroup (when the daemon could not start us inside it), so
        // that everything the program forks is in it. Not fatal: the process group still tracks what does not call setsid().
        if let cgroup {
            do {
                try Syscall.writeFile("\(cgroup)/cgroup.procs", Array(String(getpid()).utf8))
            } catch {
                _ = try? FileDescriptor.standardError.writeAll(Array("reuseportd exec-worker: cannot join \(cgroup): \(error)\n".utf8))
            }
        }
        switch UserIdentity.resolve(user: user, group: group).flatMap({ $0.apply() }) {
        case .success: break
        case .failure(let error): throw DaemonError.worker("cannot run as user \(user ?? "-") group \(group ?? "-"): \(error)")
        }
        // A change between two non-zero uids keeps the ambient set, which execve() passes on.
        try Syscall.clearAmbientCapabilities()
        // The worker's program, and all it runs, gains nothing by exec (sudo, file capabilities).
        // Set here, not as the unit's NoNewPrivileges=: under systemd that setting also keeps
        // CAP_SETUID from the daemon itself (seen with systemd 257), so it could not change to
        // the worker's user (docs/operations.md, "Sandboxing").
        try Syscall.setNoNewPrivileges()
        // Workers outlive the daemon (no PR_SET_PDEATHSIG): a daemon that crashes, is killed or
        // execs itself leaves them serving, and the next one adopts them (WorkerAdoption). A
        // daemon gone before the program even starts could not have published this pid, so no
        // later daemon would know the worker: then it does not start.
        guard getppid() == parent else { throw DaemonError.worker("the daemon (pid \(parent)) is gone; not starting") }
        // As systemd's IgnoreSIGPIPE= (on by default) does for services: a worker whose daemon
        // died writes its output into a pipe without reader, and gets EPIPE, not a fatal signal.
        signal(SIGPIPE, SIG_IGN)
        setenv(ActivationEnvironment.listenPID, String(getpid()), 1)
        if getenv(ActivationEnvironment.watchdogUsec) != nil {
            setenv(ActivationEnvironment.watchdogPID, String(getpid()), 1)
        }
        switch program {
        case .builtin(let kind):
            try BuiltinWorker(kind: kind, sockets: ActivatedSockets.fromEnvironment()).run()
        case .exec(let argv):
            let arguments = CStringArray(argv)
            execvp(argv[0], arguments.pointers)
            let code = errno
            arguments.free()
            throw ReuseportError.system("exec \(argv[0])", code)
        }
    }
}
