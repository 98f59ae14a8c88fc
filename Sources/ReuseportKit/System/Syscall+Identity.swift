#if canImport(Glibc)
import Glibc
#endif

/// A user to become: its uid and primary gid, from the passwd database or a bare number.
public struct UserAccount: Sendable, Equatable, CustomStringConvertible {
    public var uid: uid_t
    public var gid: gid_t
    public var name: String?

    public init(uid: uid_t, gid: gid_t, name: String? = nil) {
        self.uid = uid
        self.gid = gid
        self.name = name
    }

    /// getpwnam(3), else getpwuid(3) of a number; a number without a passwd entry takes the same
    /// number as its group. nil when the name is unknown.
    public static func lookUp(_ text: String) -> UserAccount? {
        if let entry = getpwnam(text) {
            return UserAccount(uid: entry.pointee.pw_uid, gid: entry.pointee.pw_gid,
                               name: String(cString: entry.pointee.pw_name))
        }
        guard let number = UInt32(text) else { return nil }
        if let entry = getpwuid(number) {
            return UserAccount(uid: number, gid: entry.pointee.pw_gid, name: String(cString: entry.pointee.pw_name))
        }
        return UserAccount(uid: number, gid: number)
    }

    public var description: String { "\(name ?? "uid \(uid)") (uid \(uid), gid \(gid))" }
}

/// The calls that drop root for good (reuseportctl's `serve-metrics`).
extension Syscall {
    /// Becomes `account` with no supplementary group but its own: setgroups(2), setgid(2), then
    /// setuid(2) (after setuid the process could no longer change its groups). As root, setuid
    /// sets the real, effective and saved uid, so the change cannot be undone; this is then
    /// verified (getresuid(2), getresgid(2), getgroups(2), and setuid(0) must fail with EPERM)
    /// because a partial drop is worse than none: it looks safe. See setuid(2), "NOTES".
    public static func becomeUser(_ account: UserAccount) throws {
        guard account.uid != 0 else {
            throw ReuseportError.invalidArgument("refusing to 'drop' to uid 0: name an unprivileged user")
        }
        var groups = [account.gid]
        try retrying("setgroups([\(account.gid)])") { setgroups(1, &groups) }
        try retrying("setgid(\(account.gid))") { setgid(account.gid) }
        try retrying("setuid(\(account.uid))") { setuid(account.uid) }
        try verifyUser(account)
    }

    /// Throws unless every uid and gid of the process (real, effective, saved, filesystem) is
    /// `account`'s, its only group is its gid and root cannot be regained. The ids are read from
    /// /proc/self/status, which shows all four of each (proc(5)); Glibc does not export
    /// getresuid(2) to Swift.
    public static func verifyUser(_ account: UserAccount) throws {
        let status = String(decoding: try readFile("/proc/self/status"), as: UTF8.self)
        func ids(_ field: String) -> [UInt32] {
            let line = status.split(separator: "\n").first { $0.hasPrefix(field + ":") } ?? ""
            return line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap {
                UInt32($0)
            }
        }
        let (uids, gids, groups) = (ids("Uid"), ids("Gid"), ids("Groups"))
        guard uids.count == 4, uids.allSatisfy({ $0 == account.uid }), gids.count == 4,
              gids.allSatisfy({ $0 == account.gid }), groups.allSatisfy({ $0 == account.gid })
        else {
            throw ReuseportError.invalidArgument(
                "dropping to \(account) left uids \(uids), gids \(gids), groups \(groups) (/proc/self/status)")
        }
        if setuid(0) == 0 || errno != EPERM {
            throw ReuseportError.invalidArgument("after dropping to \(account), setuid(0) did not fail with EPERM")
        }
    }
}
