#if canImport(Glibc)
import Glibc
#endif

/// A path the daemon would rely on that someone other than root (or the daemon's own user)
/// could change: it names the entry, its owner and its mode, and why it is refused.
public struct UntrustedPathError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The entry that failed the check (the path given, or a folder or link on the way to it).
    public var path: String
    public var owner: uid_t?
    public var mode: mode_t?
    public var problem: String
    /// Set when the entry could not be examined at all (EACCES: a folder above it this user may not search).
    public var errno: Int32?

    public var description: String {
        var text = path
        if let owner, let mode {
            text += " (owner \(UntrustedPathError.userName(owner)), mode \(UntrustedPathError.octal(mode)))"
        }
        return "\(text): \(problem)"
    }

    /// "0755", "1777": the permission bits with setuid, setgid and sticky.
    public static func octal(_ mode: mode_t) -> String {
        let text = String(mode & 0o7777, radix: 8)
        return String(repeating: "0", count: max(0, 4 - text.count)) + text
    }

    static func userName(_ uid: uid_t) -> String {
        guard let entry = getpwuid(uid) else { return "uid \(uid)" }
        return "\(String(cString: entry.pointee.pw_name)) (uid \(uid))"
    }
}

/// Checks of the paths a root daemon trusts, as sshd's StrictModes checks a user's files: every
/// entry from `/` down must be owned by root (or by one of `owners`), and no folder on the way
/// may let anyone else rename, remove or add an entry.
///
/// - A folder writable by group or others is refused, unless it has the sticky bit (`/tmp`,
///   bpffs mounted without options: mode 1777) and the next entry is owned by a trusted
///   owner: with the sticky bit only an entry's owner, the folder's owner or root may rename
///   or remove it (see the `S_ISVTX` check in `may_delete()`, fs/namei.c). sshd refuses such a
///   folder outright; this is looser, and the same rule systemd's `chase()` applies
///   (`CHASE_SAFE`: no step from a folder to an entry of another, unprivileged owner).
/// - The entry itself (a configuration file, a program, a pin root) must not be writable by
///   group or others, sticky or not.
/// - Paths are walked with lstat(2), one component at a time. The folders the daemon makes and
///   owns (pin root, run folder, per-service pin folders) must not be or pass through a symbolic
///   link at all. Files it only reads or runs may pass through links owned by a trusted owner
///   (`/bin -> usr/bin`); the link's target is then walked the same way.
///
/// Once the whole path passed, nobody but a trusted owner can change what it names, so using
/// the path afterwards (open, exec, bpf_obj_pin) reaches what was checked.
public enum TrustedPath {
    public enum Kind: Sendable {
        case directory
        case regularFile
    }

    /// What to do when the path, or a folder on the way, does not exist.
    public enum Missing: Sendable {
        /// An error naming the missing entry.
        case refuse
        /// Fine (the caller makes it later, and checks again then).
        case allow
        /// Fine only if nobody but a trusted owner could make it: the last existing folder is
        /// writable by no one else, sticky or not (anyone may add a name to a sticky folder).
        case allowIfOnlyTrustedCanCreate
        /// Make each missing folder, mode 0700 (or as `makeDirectory` is told).
        case create
    }

    /// The owners trusted by default: root and the user this process runs as.
    public static var defaultOwners: Set<uid_t> { [0, geteuid()] }

    /// The most symbolic links followed on one path (as the kernel's MAXSYMLINKS).
    static let maximumLinks = 40

    /// Checks the folder at `path` (pin root, run folder), no symbolic link on the way.
    /// Returns false when it does not exist and `missing` allows that.
    @discardableResult
    public static func checkDirectory(_ path: String, missing: Missing = .refuse,
                                      owners: Set<uid_t> = defaultOwners) throws(UntrustedPathError) -> Bool {
        try walk(path, kind: .directory, followLinks: false, missing: missing, owners: owners)
    }

    /// Makes the folder at `path` and every missing folder above it (mode `mode`, 0700 unless
    /// told: the umask does not narrow it), and checks each existing one; no symbolic link on
    /// the way. A mode with group or other write is not allowed: the check would refuse it.
    public static func makeDirectory(_ path: String, mode: mode_t = 0o700,
                                     owners: Set<uid_t> = defaultOwners) throws(UntrustedPathError) {
        precondition(mode & 0o022 == 0, "a folder root trusts is not writable by group or others")
        _ = try walk(path, kind: .directory, followLinks: false, missing: .create, owners: owners, createMode: mode)
    }

    /// Checks a file root reads or runs (a configuration file, a worker's program); trusted
    /// symbolic links on the way are followed. Returns false when it does not exist and
    /// `missing` allows that.
    @discardableResult
    public static func checkFile(_ path: String, missing: Missing = .refuse,
                                 owners: Set<uid_t> = defaultOwners) throws(UntrustedPathError) -> Bool {
        try walk(path, kind: .regularFile, followLinks: true, missing: missing, owners: owners)
    }

    private static func walk(_ path: String, kind: Kind, followLinks: Bool, missing: Missing,
                             owners: Set<uid_t>, createMode: mode_t = 0o700) throws(UntrustedPathError) -> Bool {
        var absolute = path
        if !path.hasPrefix("/") {
            guard let current = try? Syscall.currentDirectory() else {
                throw UntrustedPathError(path: path, problem: "cannot resolve a relative path: getcwd failed")
            }
            absolute = current + "/" + path
        }
        var pending = components(absolute)
        var resolved: [String] = []
        var links = 0
        // The folder holding the next entry: "/" first.
        var parent = try examine("/", missing: missing)!
        try checkOwner("/", parent, owners: owners)
        try checkFolderOnTheWay("/", parent)
        while !pending.isEmpty {
            let name = pending.removeFirst()
            if name == "." { continue }
            if name == ".." {
                if !resolved.isEmpty { resolved.removeLast() }
                parent = try examine(join(resolved), missing: .refuse)!
                continue
            }
            let entry = join(resolved + [name])
            let isLast = pending.isEmpty
            var found = try examine(entry, missing: missing)
            if found == nil {
                switch missing {
                case .refuse:
                    throw UntrustedPathError(path: entry, problem: "does not exist")
                case .allow:
                    return false
                case .allowIfOnlyTrustedCanCreate:
                    if parent.st_mode & 0o022 != 0 {
                        throw UntrustedPathError(path: join(resolved), owner: parent.st_uid, mode: parent.st_mode,
                                                 problem: "\(entry) does not exist, and anyone may create it here: "
                                                     + "the folder is writable by group or others")
                    }
                    return false
                case .create:
                    if mkdir(entry, createMode) == 0 {
                        // mkdir(2) applies the umask; the mode is what was asked, no less.
                        if chmod(entry, createMode) != 0 {
                            let code = errno
                            throw UntrustedPathError(path: entry, problem: "cannot be given mode "
                                                         + "\(UntrustedPathError.octal(createMode)): chmod: \(String(cString: strerror(code)))",
                                                     errno: code)
                        }
                    } else if errno != EEXIST {
                        throw UntrustedPathError(path: entry, problem: "cannot be made: mkdir: \(String(cString: strerror(errno)))",
                                                 errno: errno)
                    }
                    found = try examine(entry, missing: .refuse)
                }
            }
            let info = found!
            try checkOwner(entry, info, owners: owners)
            if (info.st_mode & S_IFMT) == S_IFLNK {
                guard followLinks else {
                    throw UntrustedPathError(path: entry, owner: info.st_uid, mode: info.st_mode,
                                             problem: "is a symbolic link: root follows none here")
                }
                links += 1
                guard links <= maximumLinks, let target = try? Syscall.linkTarget(entry) else {
                    throw UntrustedPathError(path: entry, problem: "too many symbolic links, or one that cannot be read")
                }
                if target.hasPrefix("/") { resolved = [] }
                pending = components(target) + pending
                if target.hasPrefix("/") { parent = try examine("/", missing: .refuse)! }
                continue
            }
            let type = info.st_mode & S_IFMT
            if !isLast {
                guard type == S_IFDIR else {
                    throw UntrustedPathError(path: entry, owner: info.st_uid, mode: info.st_mode, problem: "is not a folder")
                }
                try checkFolderOnTheWay(entry, info)
            } else {
                let expected: mode_t = kind == .directory ? S_IFDIR : S_IFREG
                guard type == expected else {
                    throw UntrustedPathError(path: entry, owner: info.st_uid, mode: info.st_mode,
                                             problem: kind == .directory ? "is not a folder" : "is not a regular file")
                }
                if info.st_mode & 0o022 != 0 {
                    throw UntrustedPathError(path: entry, owner: info.st_uid, mode: info.st_mode,
                                             problem: "is writable by group or others")
                }
            }
            resolved.append(name)
            parent = info
        }
        return true
    }

    /// nil for a missing entry when `missing` is not `.refuse`.
    private static func examine(_ path: String, missing: Missing) throws(UntrustedPathError) -> stat? {
        do {
            return try Syscall.linkStatus(path)
        } catch {
            let code = (error as? ReuseportError)?.errno ?? EIO
            if code == ENOENT && missing != .refuse { return nil }
            if code == ENOENT { throw UntrustedPathError(path: path, problem: "does not exist", errno: code) }
            throw UntrustedPathError(path: path, problem: "cannot be examined: \(String(cString: strerror(code)))",
                                     errno: code)
        }
    }

    private static func checkOwner(_ path: String, _ info: stat, owners: Set<uid_t>) throws(UntrustedPathError) {
        guard owners.contains(info.st_uid) else {
            let names = owners.sorted().map { UntrustedPathError.userName($0) }.joined(separator: " or ")
            throw UntrustedPathError(path: path, owner: info.st_uid, mode: info.st_mode,
                                     problem: "is owned by someone other than \(names)")
        }
    }

    /// A folder on the way may be writable by others only with the sticky bit (the next
    /// entry's owner is checked on its own).
    private static func checkFolderOnTheWay(_ path: String, _ info: stat) throws(UntrustedPathError) {
        if info.st_mode & 0o022 != 0 && info.st_mode & S_ISVTX == 0 {
            throw UntrustedPathError(path: path, owner: info.st_uid, mode: info.st_mode,
                                     problem: "is writable by group or others without the sticky bit")
        }
    }

    private static func components(_ path: String) -> [String] {
        path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
    }

    private static func join(_ components: [String]) -> String { "/" + components.joined(separator: "/") }
}
