#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// reuseportctl demands of a pin root what the daemon does before it reads anything there.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the test pins maps and chowns a folder to nobody: needs root"))
struct UntrustedPinTests {
    /// A pin root another user owns (with a real service pinned in it, so that only the
    /// check stands between the tool and the pins): refused, naming the folder, owner and mode.
    @Test func aPinRootAnotherUserOwnsIsNotRead() throws {
        let root = PinRoot("untrusted")
        let service = try PinnedService(root: root, slots: 1)
        _ = service
        #expect(chown(root.path, 65534, 65534) == 0 && chmod(root.path, 0o755) == 0)
        defer { chown(root.path, 0, 0) }
        let result = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(result.status == 1, "\(result)")
        #expect(result.stderr.contains("not reading the pins: \(root.path) (owner nobody (uid 65534), mode 0755)"),
                "\(result)")

        chown(root.path, 0, 0)
        chmod(root.path, 0o777)
        let writable = try reuseportctl(["map", "dump", "--pin-dir", root.path])
        #expect(writable.status == 1 && writable.stderr.contains("(owner root (uid 0), mode 0777): is writable"),
                "\(writable)")
        chmod(root.path, 0o700)
        #expect(try reuseportctl(["map", "dump", "--pin-dir", root.path]).status == 0)
    }
}
