#if canImport(Glibc)
import Glibc
#endif
import CReuseportABI
import CReuseportProcess
import SystemPackage

/// Thin wrappers over the syscalls the project makes, in one place: EINTR is retried here,
/// descriptors come back owned and close-on-exec, and every failure becomes a
/// `ReuseportError.system` naming the call, its errno and a hint.
public enum Syscall {
    /// Runs `body` until it does not fail with EINTR; returns its result or throws.
    @discardableResult
    public static func retrying<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = errno
            if code == EINTR { continue }
            throw ReuseportError.system(call(), code)
        }
    }

    /// As `retrying`, but nil when a non-blocking descriptor would block (EAGAIN).
    static func retryingUnlessWouldBlock<T: BinaryInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws
        -> T?
    {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return nil }
            throw ReuseportError.system(call(), code)
        }
    }

    /// For calls that return an error number instead of setting errno (posix_spawn and friends).
    static func checking(_ call: @autoclosure () -> String, _ result: Int32) throws {
        if result != 0 { throw ReuseportError.system(call(), result) }
    }

    /// Closes `fd`; EINTR is not retried (Linux has released the fd already, see close(2)).
    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    // MARK: sockets

    /// socket(2), close-on-exec (and non-blocking when asked).
    public static func socket(_ family: Int32, _ type: Int32, protocol: Int32 = 0, nonBlocking: Bool = false,
                              _ label: String) throws -> OwnedDescriptor
    {
        let flags = Int32(SOCK_CLOEXEC.rawValue) | (nonBlocking ? Int32(SOCK_NONBLOCK.rawValue) : 0)
        let fd = try retrying("socket(\(label))") { Glibc.socket(family, type | flags, `protocol`) }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
    }

    public static func bind(_ fd: FileDescriptor, _ address: SocketAddress, _ label: String) throws {
        _ = try address.withSockaddr { address, length in
            try retrying("bind(\(label))") { Glibc.bind(fd.rawValue, address, length) }
        }
    }

    /// bind(2) to a Unix socket path.
    public static func bind(_ fd: FileDescriptor, unixPath path: String) throws {
        _ = try withUnixAddress(path) { address, length in
            try retrying("bind(\(path))") { Glibc.bind(fd.rawValue, address, length) }
        }
    }

    /// connect(2) to an IP address (for UDP: sets the only peer the socket talks to).
    public static func connect(_ fd: FileDescriptor, _ address: SocketAddress, _ label: String) throws {
        _ = try address.withSockaddr { address, length in
            try retrying("connect(\(label))") { Glibc.connect(fd.rawValue, address, length) }
        }
    }

    /// getsockname(2): the address the socket is bound to (with port 0 asked, the port the
    /// kernel chose); nil for a family other than IPv4 and IPv6.
    public static func localAddress(_ fd: FileDescriptor, _ label: String) throws -> SocketAddress? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = try withUnsafeMutablePointer(to: &storage) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                try retrying("getsockname(\(label))") { getsockname(fd.rawValue, address, &length) }
            }
        }
        return SocketAddress(storage: storage)
    }

    /// connect(2) to a Unix socket path.
    public static func connect(_ fd: FileDescriptor, unixPath path: String) throws {
        _ = try withUnixAddress(path) { address, length in
            try retrying("connect(\(path))") { Glibc.connect(fd.rawValue, address, length) }
        }
    }

    public static func listen(_ fd: FileDescriptor, backlog: Int32, _ label: String) throws {
        try retrying("listen(\(label))") { Glibc.listen(fd.rawValue, backlog) }
    }

    /// accept4(2) of one waiting connection, close-on-exec and non-blocking, with its peer's
    /// address (nil for a Unix socket); nil when none waits.
    public static func accept(_ fd: FileDescriptor) throws -> (descriptor: OwnedDescriptor, peer: SocketAddress?)? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let client = try retryingUnlessWouldBlock("accept4") {
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { rpd_accept_nonblocking(fd.rawValue, $0, &length) }
            }
        }
        guard let client else { return nil }
        return (OwnedDescriptor(adopting: FileDescriptor(rawValue: client)), SocketAddress(storage: storage))
    }

    /// send(2) of what fits now; throws on any error, EAGAIN included.
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, flags: Int32) throws -> Int {
        try retrying("send(fd \(fd.rawValue))") { Glibc.send(fd.rawValue, bytes.baseAddress, bytes.count, flags) }
    }

    /// sendto(2) of one datagram to `address`; returns the bytes sent.
    @discardableResult
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, to address: SocketAddress,
                            flags: Int32 = 0) throws -> Int {
        try address.withSockaddr { pointer, length in
            try send(fd, bytes, to: pointer, length: length, flags: flags, "sendto(\(address))")
        }
    }

    /// sendto(2) to an address of any family (a netlink peer, say); `call` names it in errors.
    @discardableResult
    public static func send(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, to address: UnsafePointer<sockaddr>,
                            length: socklen_t, flags: Int32 = 0, _ call: @autoclosure () -> String) throws -> Int {
        try retrying(call()) { Glibc.sendto(fd.rawValue, bytes.baseAddress, bytes.count, flags, address, length) }
    }

    /// recv(2) into `buffer`: the byte count (0: the peer shut down), or nil when nothing is
    /// waiting on a non-blocking descriptor or with MSG_DONTWAIT (EAGAIN).
    public static func receive(_ fd: FileDescriptor, into buffer: inout [UInt8], flags: Int32 = 0,
                               _ call: @autoclosure () -> String = "recv") throws -> Int? {
        try retryingUnlessWouldBlock(call()) {
            buffer.withUnsafeMutableBytes { Glibc.recv(fd.rawValue, $0.baseAddress, $0.count, flags) }
        }
    }

    /// recvfrom(2) into `buffer`: the byte count and the sender (nil for a family other than
    /// IPv4 and IPv6), or nil as `receive` gives it.
    public static func receiveFrom(_ fd: FileDescriptor, into buffer: inout [UInt8], flags: Int32 = 0) throws
        -> (count: Int, source: SocketAddress?)?
    {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let count = try retryingUnlessWouldBlock("recvfrom") {
            buffer.withUnsafeMutableBytes { bytes in
                withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.recvfrom(fd.rawValue, bytes.baseAddress, bytes.count, flags, $0, &length)
                    }
                }
            }
        }
        return count.map { ($0, SocketAddress(storage: storage)) }
    }

    /// The credentials of a connected Unix socket's peer (SO_PEERCRED, unix(7)).
    public static func peerCredentials(_ fd: FileDescriptor) throws -> (pid: pid_t, uid: uid_t, gid: gid_t) {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        try retrying("getsockopt(SO_PEERCRED)") { rpd_peer_credentials(fd.rawValue, &pid, &uid, &gid) }
        return (pid, uid, gid)
    }

    public static func setOption<T: BitwiseCopyable>(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: T, _ label: String) throws {
        var value = value
        try retrying("setsockopt(\(label))") {
            setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<T>.size))
        }
    }

    public static func setOption<T: BitwiseCopyable>(_ fd: FileDescriptor, _ level: Int32, _ name: Int32, _ value: T,
                                                     _ label: String) throws {
        try setOption(fd.rawValue, level, name, value, label)
    }

    public static func getOption<T: BitwiseCopyable>(_ fd: Int32, _ level: Int32, _ name: Int32, _ type: T.Type, _ label: String) throws -> T {
        let storage = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { storage.deallocate() }
        var length = socklen_t(MemoryLayout<T>.size)
        try retrying("getsockopt(\(label))") { getsockopt(fd, level, name, storage, &length) }
        return storage.pointee
    }

    /// A `sockaddr_un` for `path`. A path that starts with "@" names a socket in the abstract
    /// namespace (unix(7)), as `NOTIFY_SOCKET` may (sd_notify(3)): the "@" becomes a NUL byte and
    /// the address length counts exactly the name's bytes, since every byte of an abstract name
    /// is significant (a padding of NULs would name another socket).
    static func withUnixAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let name = bytes.prefix(abstract ? raw.count : raw.count - 1)
            raw.copyBytes(from: name)
            if abstract { length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + name.count) }
        }
        return try withUnsafePointer(to: &address) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, length) }
        }
    }

    // MARK: pipes and reading

    /// pipe2(2), both ends close-on-exec.
    public static func pipe() throws -> (read: OwnedDescriptor, write: OwnedDescriptor) {
        var ends: [Int32] = [-1, -1]
        try retrying("pipe2") { rpd_pipe_cloexec(&ends) }
        return (OwnedDescriptor(adopting: FileDescriptor(rawValue: ends[0])),
                OwnedDescriptor(adopting: FileDescriptor(rawValue: ends[1])))
    }

    /// read(2) into `buffer`: the byte count (0 at end of file), or nil when a non-blocking
    /// descriptor has nothing now (EAGAIN).
    public static func read(_ fd: FileDescriptor, into buffer: inout [UInt8]) throws -> Int? {
        try retryingUnlessWouldBlock("read(fd \(fd.rawValue))") {
            buffer.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
        }
    }

    /// write(2) of all of `bytes`, continuing after short writes.
    public static func writeAll(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer,
                                _ call: @autoclosure () -> String) throws {
        var offset = 0
        while offset < bytes.count {
            offset += try retrying(call()) { Glibc.write(fd.rawValue, bytes.baseAddress! + offset, bytes.count - offset) }
        }
    }

    /// Reads until end of file.
    public static func readToEnd(_ fd: FileDescriptor) throws -> [UInt8] {
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while let count = try read(fd, into: &buffer), count > 0 { output += buffer[0..<count] }
        return output
    }

    /// A close-on-exec copy of `fd` numbered `lowest` or above (fcntl(2) F_DUPFD_CLOEXEC).
    public static func duplicate(_ fd: FileDescriptor, atLeast lowest: Int32 = 0) throws -> OwnedDescriptor {
        let copy = try retrying("fcntl(F_DUPFD_CLOEXEC, fd \(fd.rawValue))") { fcntl(fd.rawValue, F_DUPFD_CLOEXEC, lowest) }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: copy))
    }

    /// Sets or clears O_NONBLOCK on the open file description (fcntl(2) F_GETFL/F_SETFL).
    public static func setNonBlocking(_ fd: FileDescriptor, _ nonBlocking: Bool) throws {
        let flags = try retrying("fcntl(F_GETFL, fd \(fd.rawValue))") { fcntl(fd.rawValue, F_GETFL) }
        let wanted = nonBlocking ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
        if wanted != flags {
            try retrying("fcntl(F_SETFL, fd \(fd.rawValue))") { fcntl(fd.rawValue, F_SETFL, wanted) }
        }
    }

    /// poll(2) for input on `fds`: those readable, hung up or in error. A signal that
    /// interrupts the wait returns none rather than waiting again with a stale timeout:
    /// the caller recomputes its deadlines. `timeoutMs` -1 waits without limit.
    public static func poll(_ fds: [FileDescriptor], timeoutMs: Int32) throws -> [FileDescriptor] {
        var entries = fds.map { pollfd(fd: $0.rawValue, events: Int16(POLLIN), revents: 0) }
        if Glibc.poll(&entries, nfds_t(entries.count), timeoutMs) < 0 {
            let code = errno
            if code == EINTR { return [] }
            throw ReuseportError.system("poll", code)
        }
        return entries.filter { $0.revents != 0 }.map { FileDescriptor(rawValue: $0.fd) }
    }

    // MARK: signals and processes

    /// Blocks `signals` in this thread (sigprocmask(2)), as a signalfd needs.
    public static func blockSignals(_ signals: [Int32]) throws {
        var mask = signalSet(signals)
        try retrying("sigprocmask(SIG_BLOCK)") { sigprocmask(SIG_BLOCK, &mask, nil) }
    }

    /// signalfd(2) for `signals` (which must be blocked), close-on-exec and non-blocking.
    public static func signalfd(_ signals: [Int32]) throws -> OwnedDescriptor {
        var mask = signalSet(signals)
        let fd = try retrying("signalfd") { rpd_signalfd(&mask) }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
    }

    /// The next signal queued on a signalfd, nil when none is.
    public static func readSignal(_ fd: FileDescriptor) throws -> Int32? {
        let signal = try retrying("read(signalfd)") { rpd_signalfd_read(fd.rawValue) }
        return signal == 0 ? nil : signal
    }

    static func signalSet(_ signals: [Int32]) -> sigset_t {
        var mask = sigset_t()
        sigemptyset(&mask)
        for signal in signals { sigaddset(&mask, signal) }
        return mask
    }

    /// kill(2); a negative `pid` names a process group.
    public static func kill(_ pid: pid_t, _ signal: Int32) throws {
        try retrying("kill(\(pid), \(signal))") { Glibc.kill(pid, signal) }
    }

    /// waitpid(2) for `pid` (-1: any child). With `block` false, nil when no such child has
    /// exited yet.
    public static func wait(_ pid: pid_t = -1, block: Bool) throws -> (pid: pid_t, status: WaitStatus)? {
        var status: Int32 = 0
        let reaped = try retrying("waitpid(\(pid))") { waitpid(pid, &status, block ? 0 : WNOHANG) }
        return reaped == 0 ? nil : (reaped, WaitStatus(raw: status))
    }

    /// pidfd_open(2) (Linux 5.3): a descriptor that stays bound to this one process, which
    /// becomes readable when it exits and is safe against pid reuse.
    public static func pidfdOpen(_ pid: pid_t) throws -> OwnedDescriptor {
        let fd = try retrying("pidfd_open(\(pid))") { rpd_pidfd_open(pid) }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
    }

    /// prctl(PR_SET_PDEATHSIG): `signal` comes when the parent exits. Credential changes
    /// clear it (kernel/cred.c, commit_creds()): set it after dropping privileges.
    public static func setParentDeathSignal(_ signal: Int32) throws {
        try retrying("prctl(PR_SET_PDEATHSIG)") { rpd_set_parent_death_signal(signal) }
    }

    // MARK: files

    /// open(2), close-on-exec.
    public static func open(_ path: String, _ flags: Int32, mode: mode_t = 0) throws -> OwnedDescriptor {
        let fd = try retrying("open(\(path))") { Glibc.open(path, flags | O_CLOEXEC, mode) }
        return OwnedDescriptor(adopting: FileDescriptor(rawValue: fd))
    }

    /// The whole content of `path`.
    public static func readFile(_ path: String) throws -> [UInt8] {
        let file = try open(path, O_RDONLY)
        return try file.withFD { try readToEnd(FileDescriptor(rawValue: $0)) }
    }

    /// Replaces the content of `path` (created with `mode` if missing) with `bytes`.
    public static func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws {
        let file = try open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: mode)
        try file.withFD { fd in
            try bytes.withUnsafeBytes { try writeAll(FileDescriptor(rawValue: fd), $0, "write(\(path))") }
        }
    }

    /// mkdir -p with `mode` for the folders it creates.
    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws {
        var current = ""
        for component in path.split(separator: "/") {
            current += "/\(component)"
            if mkdir(current, mode) != 0 && errno != EEXIST { throw ReuseportError.system("mkdir(\(current))") }
        }
    }

    /// readlink("/proc/self/exe"): this program's own path.
    public static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: receive queues

    /// ioctl(SIOCINQ): for a UDP socket, the length of the datagram at the head of its receive
    /// queue, 0 when the queue is empty (udp_ioctl → first_packet_length in net/ipv4/udp.c; a
    /// queued empty datagram also reads 0). A TCP listener answers EINVAL (tcp_ioctl).
    /// SIOCINQ is FIONREAD (linux/sockios.h); Swift sees only the latter.
    public static func queuedBytes(_ fd: FileDescriptor) throws -> Int {
        var count: Int32 = 0
        try retrying("ioctl(fd \(fd.rawValue), SIOCINQ)") { ioctl(fd.rawValue, UInt(FIONREAD), &count) }
        return Int(count)
    }

    /// Whether `signal` is ignored (SIG_IGN, for example inherited through exec from `trap ''`
    /// or nohup): sigaction(2) read without changing it.
    public static func isIgnored(_ signal: Int32) -> Bool {
        var current = sigaction()
        guard sigaction(signal, nil, &current) == 0, let handler = current.__sigaction_handler.sa_handler else {
            return false
        }
        return unsafeBitCast(handler, to: Int.self) == 1  // SIG_IGN is ((__sighandler_t) 1)
    }

    /// Connections waiting in a TCP listener's accept queue: TCP_INFO's tcpi_unacked, which a
    /// listening socket fills with sk_ack_backlog (tcp_get_info() in net/ipv4/tcp.c).
    public static func acceptQueueLength(_ fd: FileDescriptor) throws -> Int {
        // struct tcp_info has bitfields, so it is read as bytes.
        let size = MemoryLayout<tcp_info>.size
        let offset = MemoryLayout<tcp_info>.offset(of: \tcp_info.tcpi_unacked)!
        let storage = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { storage.deallocate() }
        var length = socklen_t(size)
        try retrying("getsockopt(fd \(fd.rawValue), TCP_INFO)") {
            getsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_INFO, storage, &length)
        }
        return Int(storage.load(fromByteOffset: offset, as: UInt32.self))
    }

    /// recv(2) with MSG_DONTWAIT | MSG_TRUNC into no buffer: takes one datagram off the socket's
    /// queue and discards it. False when the queue is empty (EAGAIN).
    public static func discardDatagram(_ fd: FileDescriptor) throws -> Bool {
        while true {
            if recv(fd.rawValue, nil, 0, Int32(MSG_DONTWAIT | MSG_TRUNC)) >= 0 { return true }
            let code = errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return false }
            throw ReuseportError.system("recv(fd \(fd.rawValue), MSG_TRUNC)", code)
        }
    }

    // MARK: limits

    /// The soft and hard RLIMIT_NOFILE of this process (getrlimit(2)): a new descriptor gets
    /// EMFILE once every number below the soft limit is taken.
    public static func openFileLimit() throws -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        try retrying("getrlimit(RLIMIT_NOFILE)") { getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }
}
