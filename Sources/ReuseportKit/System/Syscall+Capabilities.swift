#if canImport(Glibc)
import Glibc
#endif
import CReuseportProcess

/// One Linux capability (capabilities(7)), by its number in linux/capability.h.
public struct Capability: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let number: Int32

    public init(_ number: Int32) { self.number = number }

    public static let dacOverride = Capability(CAP_DAC_OVERRIDE)
    public static let kill = Capability(CAP_KILL)
    public static let setgid = Capability(CAP_SETGID)
    public static let setuid = Capability(CAP_SETUID)
    public static let setpcap = Capability(CAP_SETPCAP)
    public static let netBindService = Capability(CAP_NET_BIND_SERVICE)
    public static let netAdmin = Capability(CAP_NET_ADMIN)
    public static let sysPtrace = Capability(CAP_SYS_PTRACE)
    public static let sysAdmin = Capability(CAP_SYS_ADMIN)
    public static let perfmon = Capability(CAP_PERFMON)
    /// Linux 5.8; before, BPF needs CAP_SYS_ADMIN.
    public static let bpf = Capability(CAP_BPF)

    /// The kernel's name, "CAP_BPF" (or "CAP_<number>" for one newer than this table).
    public var description: String {
        Capability.names.indices.contains(Int(number)) ? "CAP_" + Capability.names[Int(number)] : "CAP_\(number)"
    }

    public static func < (lhs: Capability, rhs: Capability) -> Bool { lhs.number < rhs.number }

    // In the order of linux/capability.h (CAP_CHOWN = 0 … CAP_CHECKPOINT_RESTORE = 40).
    private static let names = [
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE",
    ]
}

/// A set of capabilities, one bit per number, as the kernel keeps them (and as
/// /proc/PID/status shows them in hex: `CapEff:	00000080000014e0`).
public struct CapabilitySet: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64

    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public init(_ capabilities: [Capability]) {
        self.init(rawValue: capabilities.reduce(0) { $0 | 1 << UInt64($1.number) })
    }

    public func contains(_ capability: Capability) -> Bool { rawValue & 1 << UInt64(capability.number) != 0 }

    public var members: [Capability] {
        (0..<64).filter { rawValue & 1 << UInt64($0) != 0 }.map { Capability(Int32($0)) }
    }

    /// "CAP_KILL, CAP_BPF", or "none".
    public var description: String { members.isEmpty ? "none" : members.map(\.description).joined(separator: ", ") }
}

/// The capability sets of a process (capabilities(7)); the bounding and ambient sets are
/// read and changed with prctl, one capability at a time.
public struct ProcessCapabilities: Equatable, Sendable {
    public var effective: CapabilitySet
    public var permitted: CapabilitySet
    public var inheritable: CapabilitySet

    public init(effective: CapabilitySet, permitted: CapabilitySet, inheritable: CapabilitySet) {
        self.effective = effective
        self.permitted = permitted
        self.inheritable = inheritable
    }
}

/// The calls that read and drop this process's capabilities (ReuseportDaemon's DaemonPrivileges).
extension Syscall {
    /// capget(2) of this process.
    public static func capabilities() throws -> ProcessCapabilities {
        var effective: UInt64 = 0, permitted: UInt64 = 0, inheritable: UInt64 = 0
        try retrying("capget") { rpd_capget(&effective, &permitted, &inheritable) }
        return ProcessCapabilities(effective: CapabilitySet(rawValue: effective),
                                   permitted: CapabilitySet(rawValue: permitted),
                                   inheritable: CapabilitySet(rawValue: inheritable))
    }

    /// capset(2) of this process: may only lower the permitted set (EPERM otherwise).
    public static func setCapabilities(_ sets: ProcessCapabilities) throws {
        try retrying("capset") {
            rpd_capset(sets.effective.rawValue, sets.permitted.rawValue, sets.inheritable.rawValue)
        }
    }

    /// The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap, 3.2);
    /// 39 or more means it has CAP_BPF.
    public static func lastCapability() -> Int32? {
        guard let bytes = try? readFile("/proc/sys/kernel/cap_last_cap") else { return nil }
        return Int32(String(decoding: bytes.filter { $0 != UInt8(ascii: "\n") }, as: UTF8.self))
    }

    /// The bounding set (prctl(PR_CAPBSET_READ) of every capability the kernel knows).
    public static func boundingSet() throws -> CapabilitySet {
        let last = lastCapability() ?? 63
        var set = CapabilitySet()
        for number in 0...last {
            let held = try retrying("prctl(PR_CAPBSET_READ, \(number))") { rpd_capbset_read(number) }
            if held == 1 { set.insert(CapabilitySet([Capability(number)])) }
        }
        return set
    }

    /// prctl(PR_CAPBSET_DROP): no execve() of this process or its children can grant `capability`
    /// again, not even to root. Needs CAP_SETPCAP (EPERM).
    public static func dropFromBoundingSet(_ capability: Capability) throws {
        try retrying("prctl(PR_CAPBSET_DROP, \(capability))") { rpd_capbset_drop(capability.number) }
    }

    /// prctl(PR_SET_NO_NEW_PRIVS): from now on execve() grants no privilege, neither through a
    /// set-user-ID program (sudo) nor through file capabilities, to this process or its children.
    /// It cannot be undone.
    public static func setNoNewPrivileges() throws {
        try retrying("prctl(PR_SET_NO_NEW_PRIVS)") { rpd_set_no_new_privs() }
    }

    /// prctl(PR_CAP_AMBIENT_CLEAR_ALL): the next execve() passes no capability on by the ambient
    /// set. A kernel before 4.3 has no ambient set (EINVAL): nothing to clear.
    public static func clearAmbientCapabilities() throws {
        if rpd_ambient_clear_all() == 0 || errno == EINVAL { return }
        throw ReuseportError.system("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", errno)
    }
}
