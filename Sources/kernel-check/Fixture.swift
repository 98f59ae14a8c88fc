import ReuseportKit

/// What every check builds the same way.
enum Fixture {
    static let seed: UInt32 = 0x5eed
    /// Every datagram of a round is sent before any is read: 1 MiB per socket (root may
    /// exceed net.core.rmem_max) keeps the kernel from dropping any, even when the kernel's
    /// own hash gives one socket far more than its share.
    static let receiveBuffer = 1 << 20

    /// A steered service of `slots` sockets on `address` port 0.
    static func service(_ transport: Transport, on address: IPAddress, slots: Int, v6Only: Bool = true) throws
        -> ServiceDataPlane
    {
        try ServiceDataPlane(endpoints: [Endpoint(transport, SocketAddress(address, 0))], slotCount: slots,
                             options: .init(seed: seed, receiveBuffer: receiveBuffer, v6Only: v6Only))
    }

    /// A socket joining the reuseport group of `endpoint` (or a new group on port 0).
    static func socket(_ endpoint: Endpoint) throws -> ReuseportSocket {
        try ReuseportSocket(endpoint: endpoint, receiveBuffer: receiveBuffer)
    }
}
