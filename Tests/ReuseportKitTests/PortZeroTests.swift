#if canImport(Glibc)
import Glibc
#endif
import ReuseportTestTraits
import Testing
@testable import ReuseportKit

/// A socket asked for port 0 gets a port no other socket holds. The kernel's own UDP autobind
/// with SO_REUSEPORT set may put it in a reuseport group of the same user that holds the port
/// (`ReuseportSocket.unusedPort`): then a service on port 0 would share its traffic with another
/// service, as the test daemons of a full parallel run, all root and all on 127.0.0.1:0, could.
/// Before the fix the UDP case failed here (19 of 900 holders shared a port, and 10 or more of
/// 400 sockets joined a holder's group). No root needed.
@Suite(.onTestThreads) struct PortZeroTests {
    /// An address of its own, so that no other test's sockets count.
    static let address = IPAddress("127.0.0.77")!
    static let held = 900
    static let asked = 400

    /// 900 reuseport groups hold 900 ports of the address (about 3 % of the ephemeral range);
    /// 400 sockets asked for port 0, with both transports. With the kernel's autobind, about 13
    /// of them would land on a held port (the chance that none does is below 1e-5); here none may.
    @Test(arguments: [Transport.udp, .tcp])
    func portZeroNeverJoinsAnotherGroup(_ transport: Transport) throws {
        let holders = try (0..<Self.held).map { _ in
            try ReuseportSocket(endpoint: Endpoint(transport, SocketAddress(Self.address, 0)))
        }
        defer { for holder in holders { holder.close() } }
        let heldPorts = Set(holders.map(\.endpoint.address.port))
        #expect(heldPorts.count == Self.held, "each holder has a port of its own")
        var joined: [UInt16] = []
        for _ in 0..<Self.asked {
            let socket = try ReuseportSocket(endpoint: Endpoint(transport, SocketAddress(Self.address, 0)))
            if heldPorts.contains(socket.endpoint.address.port) { joined.append(socket.endpoint.address.port) }
            socket.close()
        }
        #expect(joined.isEmpty, "\(joined.count) of \(Self.asked) \(transport) sockets asked for port 0 were bound to a port a reuseport group held: \(joined.prefix(10))")
    }

    /// The kernel's behaviour this works around, shown: an SO_REUSEPORT socket autobound to port 0
    /// is given held ports. If a kernel stops doing so, this fails, and `unusedPort` can go.
    @Test func theKernelsReuseportAutobindJoinsHeldPorts() throws {
        let holders = try (0..<Self.held).map { _ in
            try ReuseportSocket(endpoint: Endpoint(.udp, SocketAddress(Self.address, 0)))
        }
        defer { for holder in holders { holder.close() } }
        let heldPorts = Set(holders.map(\.endpoint.address.port))
        var joined = 0
        for _ in 0..<Self.asked {
            let probe = try Syscall.socket(AF_INET, Transport.udp.socketType, "udp")
            try Syscall.setOption(probe.fd.rawValue, SOL_SOCKET, SO_REUSEPORT, Int32(1), "SO_REUSEPORT")
            try Syscall.bind(probe.fd, SocketAddress(Self.address, 0), "autobind")
            if let bound = try Syscall.localAddress(probe.fd, "autobind"), heldPorts.contains(bound.port) { joined += 1 }
        }
        print("the kernel's reuseport autobind: \(joined) of \(Self.asked) landed on one of \(Self.held) held ports")
        #expect(joined > 0, "no autobind with SO_REUSEPORT landed on a held port")
    }
}
