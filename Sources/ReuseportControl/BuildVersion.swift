import CReuseportVersion

/// The version both binaries were built as: the Debian package's version (`make` computes it from
/// git: `0.1.0~gitDATE.COMMIT`, `-dirty` when the tree had changes), or
/// "unknown (built without make)". The daemon sends it in every status answer (`DaemonIdentity`).
public enum BuildVersion {
    public static let string = String(cString: rp_version())
}
