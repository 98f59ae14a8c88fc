#if canImport(Glibc)
import Glibc
#endif

/// Every failure the kit reports. Each names the call that failed, the errno it gave
/// and, where one is known, a hint at the usual cause.
public enum ReuseportError: Error, CustomStringConvertible, Equatable, Sendable {
    /// A syscall or libbpf call failed. `call` names it, with its main argument.
    case system(call: String, errno: Int32, hint: String?)
    /// A map's key or value size in the kernel disagrees with the layout Swift was built with.
    case abiMismatch(map: String, field: String, kernel: Int, expected: Int)
    /// The daemon's records pinned at `directory` are of records version `found`
    /// (bpf/records.h), which this build neither reads nor migrates (`ServiceRecords.Version`).
    case recordsVersion(directory: String, found: UInt32)
    /// Input that can never work: a malformed address, a slot out of range.
    case invalidArgument(String)
    /// The kernel's verifier refused `program` of `object`: `verdict` is what it said last (for
    /// example "BPF program is too large. Processed 1000001 insn"), `logPath` a file with its
    /// whole log, when that could be written.
    case programRefused(object: String, program: String, errno: Int32, verdict: String, logPath: String?)

    public var description: String {
        switch self {
        case .system(let call, let errno, let hint):
            var text = "\(call): \(String(cString: strerror(errno))) (errno \(errno))"
            if let hint { text += "; \(hint)" }
            return text
        case .abiMismatch(let map, let field, let kernel, let expected):
            return "map \(map): \(field) is \(kernel) bytes in the kernel but \(expected) in this build"
                + "; the pinned maps belong to another version of reuseportd (remove the pins or use that version)"
        case .recordsVersion(let directory, let found):
            let migrated = ServiceRecords.migrations.sorted().map(String.init).joined(separator: ", ")
            return "the records pinned at \(directory) are of records version \(found)"
                + (found > UInt32(RP_RECORDS_VERSION) ? " (a newer reuseportd's)" : " (not one this build knows)")
                + "; this build reads version \(RP_RECORDS_VERSION)" + (migrated.isEmpty ? "" : " and migrates \(migrated)")
        case .invalidArgument(let text):
            return text
        case .programRefused(let object, let program, let errno, let verdict, let logPath):
            var text = "bpf_object__load(\(object)): the kernel's verifier refused program \(program): "
                + (verdict.isEmpty ? "it gave no reason" : verdict)
                + " (errno \(errno), \(String(cString: strerror(errno))))"
            text += logPath.map { "; verifier log: \($0)" } ?? ""
            return text + "; \(Self.refusedHint)"
        }
    }

    static let refusedHint = "this kernel cannot run this build of the program: check `reuseportctl features`, "
        + "and report the kernel (uname -r) with the verifier log"


    /// The errno of a `.system` or `.programRefused` error.
    public var errno: Int32? {
        switch self {
        case .system(_, let errno, _), .programRefused(_, _, let errno, _, _): return errno
        default: return nil
        }
    }

    /// Builds a `.system` error from `errno` with the hint usual for that call and errno.
    public static func system(_ call: String, _ code: Int32 = Glibc.errno) -> ReuseportError {
        .system(call: call, errno: code, hint: hint(call: call, errno: code))
    }

    /// The hint for `errno` from `call`: chosen by the call and the errno together, never by
    /// the errno alone (E2BIG means "key beyond the map" from a map call, but "program too
    /// large" or "attribute too big" from others).
    private static func hint(call: String, errno: Int32) -> String? {
        let bpf = call.hasPrefix("bpf")
        let mapCall = call.hasPrefix("bpf_map_")
        // Calls on paths (pins, the run folder): a permission error there is about who we are.
        // A Unix socket's bind names its path (`bind(/run/reuseportd/control.sock)`): a file call, not a port.
        let fileCall = ["bpf_obj_get", "bpf_obj_pin", "open", "mkdir", "unlink", "rmdir", "chmod", "bind(/"].contains {
            call.hasPrefix($0)
        }
        switch errno {
        case EPERM where bpf || call.hasPrefix("mount"):
            return "needs root, or CAP_BPF with CAP_NET_ADMIN (and CAP_SYS_ADMIN to mount bpffs)"
        case EPERM where fileCall, EACCES where fileCall:
            return "needs root"
        case EPERM where call.hasPrefix("bind"), EACCES where call.hasPrefix("bind"):
            return "ports below 1024 need root or CAP_NET_BIND_SERVICE"
        case EADDRINUSE where call.hasPrefix("bind(/"):
            return "a file is in the way at that path"
        case EADDRINUSE where call.hasPrefix("bind") || call.hasPrefix("listen"):
            return "another socket holds this address without SO_REUSEPORT, or under another user"
        case EADDRNOTAVAIL where call.hasPrefix("bind"):
            return "the address is not configured on any interface of this host"
        case ENOENT where call.hasPrefix("bpf_obj_get"):
            return "nothing is pinned there: is the daemon running, and is --pin-dir right?"
        case EINVAL where call.contains("sockarray"):
            return "a socket must be bound (TCP: listening) with SO_REUSEPORT before it enters the array"
        case EBUSY where call.contains("sockarray"):
            return "the socket is already in the array (at this slot or another) or in another one: remove it first"
        case E2BIG where mapCall:
            return "the key is beyond the map's size"
        case ENOSYS where call.hasPrefix("clone3"), EINVAL where call.hasPrefix("clone3"),
             E2BIG where call.hasPrefix("clone3"):
            return "CLONE_INTO_CGROUP needs Linux 5.7 (and no seccomp filter that refuses clone3)"
        case EACCES where call.hasPrefix("clone3"), EPERM where call.hasPrefix("clone3"):
            return "creating a process in a cgroup needs write access to its cgroup.procs (root, or a delegated cgroup)"
        case EPERM where call.hasPrefix("pidfd_getfd"):
            return "copying another process's descriptor needs CAP_SYS_PTRACE (ptrace access mode attach)"
        case ENOSYS where call.hasPrefix("pidfd"):
            return "pidfd_open needs Linux 5.3, pidfd_getfd 5.6 (or a seccomp filter refuses them)"
        case ENOMEM where bpf:
            return "kernels before 5.11 charge maps to RLIMIT_MEMLOCK: raise it (ulimit -l) or run as root"
        default:
            return nil
        }
    }
}
