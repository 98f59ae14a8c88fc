#if canImport(Glibc)
import Glibc
#endif

/// The user and group a worker runs as, resolved from names or numeric ids.
public struct UserIdentity: Sendable, Equatable {
    public var uid: uid_t?
    public var gid: gid_t?
    /// The user name, for initgroups (supplementary groups); nil for a bare numeric uid.
    public var userName: String?

    /// Looks up a user by name or numeric id.
    public static func lookUpUser(_ text: String) -> (uid: uid_t, gid: gid_t, name: String?)? {
        if let entry = getpwnam(text) {
            return (entry.pointee.pw_uid, entry.pointee.pw_gid, String(cString: entry.pointee.pw_name))
        }
        guard let number = UInt32(text) else { return nil }
        if let entry = getpwuid(number) {
            return (number, entry.pointee.pw_gid, String(cString: entry.pointee.pw_name))
        }
        // A uid without a passwd entry: its group defaults to the same number.
        return (number, number, nil)
    }

    /// Looks up a group by name or numeric id.
    public static func lookUpGroup(_ text: String) -> gid_t? {
        if let entry = getgrnam(text) { return entry.pointee.gr_gid }
        return UInt32(text)
    }

    /// Resolves the configured `user` and `group`; nil for both means "stay as we are".
    public static func resolve(user: String?, group: String?) -> Result<UserIdentity, DaemonError> {
        var identity = UserIdentity()
        if let user {
            guard let entry = lookUpUser(user) else { return .failure(DaemonError.identity("no such user '\(user)'")) }
            identity.uid = entry.uid
            identity.gid = entry.gid
            identity.userName = entry.name
        }
        if let group {
            guard let gid = lookUpGroup(group) else { return .failure(DaemonError.identity("no such group '\(group)'")) }
            identity.gid = gid
        }
        return .success(identity)
    }

    /// Drops to this identity: supplementary groups, then gid, then uid (the order matters:
    /// after setuid the process may no longer change its groups).
    public func apply() -> Result<Void, DaemonError> {
        // Already that user and group (a daemon not run as root, configured with its own user):
        // nothing to change, and setgroups would need privileges.
        guard uid.map({ $0 != getuid() }) ?? false || gid.map({ $0 != getgid() }) ?? false else { return .success(()) }
        if let gid {
            if let userName, uid != nil {
                if initgroups(userName, gid) != 0 { return .failure(.identityCall("initgroups(\(userName), \(gid))")) }
            } else {
                var groups = [gid]
                if setgroups(1, &groups) != 0 { return .failure(.identityCall("setgroups([\(gid)])")) }
            }
            if setgid(gid) != 0 { return .failure(.identityCall("setgid(\(gid))")) }
        }
        if let uid, setuid(uid) != 0 { return .failure(.identityCall("setuid(\(uid))")) }
        return .success(())
    }
}

