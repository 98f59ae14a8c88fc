import CReuseportABI

/// One of the reference programs of bpf/baseline.bpf.c, loaded from the object embedded
/// in the binary: what the benchmarks measure the steering program against.
///
/// Needs the same kernel as `DispatchProgram` (SK_REUSEPORT, REUSEPORT_SOCKARRAY: 4.19).
public final class BaselineProgram: ReuseportProgram, @unchecked Sendable {
    public enum Kind: String, Sendable, CaseIterable {
        /// `return SK_PASS` and nothing else: the kernel then selects by its own hash.
        case pass
        /// Selects the socket at RP_BASELINE_FIXED_SLOT of its own socket array.
        case fixedSlot
        /// Copies out the packet's IP addresses as rp_dispatch does, then selects like `.fixedSlot`.
        case addressLoad

        var programName: String {
            switch self {
            case .pass: RP_PROG_BASELINE_PASS
            case .fixedSlot: RP_PROG_BASELINE_FIXED
            case .addressLoad: RP_PROG_BASELINE_LOAD
            }
        }
    }

    public let kind: Kind
    private let descriptor: OwnedDescriptor
    /// The loaded program's fd; this object owns it and must outlive its use.
    public var programFD: Int32 { descriptor.fd.rawValue }
    /// The program's REUSEPORT_SOCKARRAY (not used by `.pass`).
    public let sockets: SocketArray

    public init(_ kind: Kind) throws {
        let object = try EmbeddedObject(rp_baseline_object(), count: rp_baseline_object_size(),
                                        name: "baseline.bpf.o")
        try object.load()
        self.kind = kind
        descriptor = try object.programFD(kind.programName)
        sockets = try SocketArray(RP_MAP_BASELINE_SOCKETS, in: object)
    }
}
