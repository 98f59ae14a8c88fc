#if canImport(Glibc)
import Glibc
#endif
import Logging
import ReuseportKit

/// The capabilities the daemon keeps once it has started (docs/operations.md, "Privileges"),
/// and the drop of every other one.
///
/// Start-up may need more than the rest of the run: mounting bpffs takes CAP_SYS_ADMIN. After
/// it, the daemon keeps what a reload and the workers' starts need, and lowers its effective,
/// permitted and inheritable sets to that. With CAP_SETPCAP it also lowers the bounding set:
/// a root process that calls execve() gets every capability of the bounding set back
/// (capabilities(7), "Capabilities and execution of programs by root"), so without that drop
/// `exec-worker` and `check-config` would regain CAP_SYS_ADMIN. Under systemd the unit's
/// `CapabilityBoundingSet=` does that instead.
///
/// Workers get none of it: `exec-worker` changes to the worker's user, which clears every set
/// when it leaves uid 0 (kernel/cred.c via cap_task_fix_setuid()), and clears the ambient set
/// before it execs the program, which a change between two non-zero uids would keep.
/// A worker without `user` runs as root with the daemon's bounding set.
enum DaemonPrivileges {
    /// What each kept capability is for; the same list as docs/operations.md.
    static let reasons: [(Capability, String)] = [
        (.bpf, "load the program and create the maps (start-up, and reloads that rebuild a service)"),
        (.netAdmin, "with CAP_BPF, load an SK_REUSEPORT program; SO_RCVBUFFORCE for rcvbuf past net.core.rmem_max"),
        // Without it the verifier applies its checks for callers that may not see kernel pointers:
        // 6.1 refuses rp_dispatch ("attempt to corrupt spilled pointer on stack"), 6.12 does not.
        (.perfmon, "with CAP_BPF, have rp_dispatch accepted by the verifier of kernels such as 6.1"),
        (.netBindService, "bind ports below 1024 (a reload may add one)"),
        (.setuid, "exec-worker changes to the worker's user"),
        (.setgid, "exec-worker changes to the worker's group and supplementary groups"),
        (.kill, "signal workers (and what they forked) that run as another user"),
        (.sysPtrace, "copy an adopted worker's sockets out of it (pidfd_getfd) when it runs as another user: after a crash, a kill or `daemon reexec`"),
    ]

    /// The capabilities needed after start-up on this kernel: without CAP_BPF (before 5.8, or
    /// cap_last_cap below 39) bpf() needs CAP_SYS_ADMIN instead.
    static func needed(lastCapability: Int32? = Syscall.lastCapability()) -> CapabilitySet {
        var needed = CapabilitySet(reasons.map(\.0))
        if let last = lastCapability, last < Capability.bpf.number {
            needed.remove(CapabilitySet([.bpf, .perfmon]))
            needed.insert(CapabilitySet([.sysAdmin]))
        }
        return needed
    }

    /// CAP_DAC_OVERRIDE when the folder holding the workers' cgroups (`reuseportd-<pid>`) is not
    /// writable by its owner, the daemon: it could not remove that folder at stop. A unit's
    /// cgroup with Delegate=yes is root's, mode 0755, so under systemd this is empty; a
    /// container's read-only (0555) cgroup root is the case it is for.
    static func neededForCgroups(_ cgroups: WorkerCgroups?) -> CapabilitySet {
        guard let root = cgroups?.root, let slash = root.lastIndex(of: "/") else { return [] }
        var st = stat()
        guard stat(String(root[..<slash]), &st) == 0 else { return [] }
        return st.st_uid == geteuid() && st.st_mode & S_IWUSR != 0 ? [] : CapabilitySet([.dacOverride])
    }

    /// Lowers every set to `needed()` (and what `cgroups` needs): called once start-up (bpffs
    /// mounted, sockets bound, the workers' cgroup made) is over. Logs what it keeps; a
    /// failure is logged, not fatal (the daemon still works, with more than it needs).
    static func dropUnneeded(cgroups: WorkerCgroups?, logger: Logger) {
        let forCgroups = neededForCgroups(cgroups)
        if forCgroups.contains(.dacOverride), let root = cgroups?.root {
            logger.notice("""
                capabilities: keeping CAP_DAC_OVERRIDE to remove \(root) at stop \
                (the folder it is in is not writable by its owner)
                """)
        }
        let needed = needed().union(forCgroups)
        do {
            let before = try Syscall.capabilities()
            let keep = before.permitted.intersection(needed)
            if before.effective.contains(.setpcap) {
                for capability in try Syscall.boundingSet().subtracting(keep).members {
                    try Syscall.dropFromBoundingSet(capability)
                }
            }
            // CAP_SETPCAP goes here too: after this, nothing can be raised again.
            try Syscall.setCapabilities(ProcessCapabilities(effective: keep, permitted: keep,
                                                            inheritable: before.inheritable.intersection(keep)))
            let dropped = before.permitted.subtracting(keep)
            let bounding = try Syscall.boundingSet()
            let droppedText = dropped.isEmpty ? "" : "; dropped \(dropped)"
            logger.notice("capabilities: keeping \(keep); bounding set \(bounding)\(droppedText)")
            let missing = needed.subtracting(keep)
            if !missing.isEmpty {
                let uses = reasons.filter { missing.contains($0.0) }.map { "\($0.0) would \($0.1)" }
                    .joined(separator: "; ")
                logger.notice("capabilities: running without \(missing): \(uses)")
            }
        } catch {
            logger.warning("capabilities: cannot drop the ones not needed after start-up: \(error)")
        }
    }
}
