#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import Testing

/// The daemon keeps serving whatever its workers and operators do: a worker that floods its
/// output, a daemon out of file descriptors, a datagram too large to echo.
@Suite(.serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct ResilienceTests {
    /// A 65,507-byte datagram (the largest over IPv4) gets a whoami answer of 65,507 bytes: the
    /// start of the payload, and the header says how much was left out.
    @Test func whoamiAnswersTheLargestDatagram() throws {
        let daemon = try TestDaemon(config: serviceTable("big", workers: 1))
        let services = try daemon.waitForWorkers()
        let destination = try udpEndpoint(services, "big")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        let payload = (0..<65_507).map { UInt8(truncatingIfNeeded: $0 % 251) }
        let reply = try #require(try Whoami.ask([client], to: destination, payload: { _ in payload })[0],
                                 "no answer to 65,507 bytes; \(daemon.logTail())")
        #expect(reply.truncated > 0)
        #expect(reply.payload.count + reply.truncated == payload.count)
        #expect(reply.payload[...] == payload.prefix(reply.payload.count))
        let header = "slot=\(reply.slot) pid=\(reply.pid) service=big peer=\(reply.peer) truncated=\(reply.truncated)\n"
        #expect(header.utf8.count + reply.payload.count == 65_507, "the answer fills one datagram")

        // A datagram that fits is echoed whole, without the field.
        let small = try #require(try Whoami.ask([client], to: destination, payload: { _ in Array("hello".utf8) })[0])
        #expect(small.truncated == 0 && small.payload == Array("hello".utf8))
    }
}
