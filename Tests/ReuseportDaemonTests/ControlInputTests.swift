#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// Bad control requests get an error that names what is wrong; none of them crashes the
/// daemon, stalls it, or disturbs a slot.
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot && TestDaemon.isBuilt, "needs root and the reuseportd binary"))
struct ControlInputTests {
    func answer(_ daemon: TestDaemon, _ text: String) throws -> ControlResponse? {
        guard let bytes = try daemon.exchange(Array(text.utf8)) else { return nil }
        return try? ControlFraming.decode(ControlResponse.self, from: Data(bytes.prefix { $0 != 0x0a }))
    }

    @Test func malformedRequestsAreRefusedAndTheDaemonServesOn() throws {
        let daemon = try TestDaemon(config: serviceTable("steady", workers: 2))
        let before = try daemon.waitForWorkers()
        let endpoint = try udpEndpoint(before, "steady")

        // A client that connects and never sends must not block anyone else.
        let silent = try daemon.connectControl()
        defer { close(silent) }

        let cases: [(request: String, mentions: String)] = [
            ("hello\n", "JSON"),
            ("{\"command\": \"explode\"}\n", "explode"),
            ("{\"command\": \"restart\", \"service\": \"steady\"}\n", "slot"),
            ("{\"command\": \"restart\", \"service\": \"steady\", \"slot\": -1}\n", "field 'slot' must be"),
            ("{\"command\": 7}\n", "field 'command' must be one of status, restart, scale, reload"),
            ("{\"service\": \"steady\"}\n", "missing field 'command'"),
            ("{\"command\": \"scale\", \"service\": \"steady\", \"workers\": 999999}\n", "1024"),
            ("{\"command\": \"scale\", \"service\": \"nope\", \"workers\": 2}\n", "nope"),
            ("[1, 2, 3]\n", "not a JSON object"),
            ("\u{0}\u{1}\u{2}\n", "not JSON"),
        ]
        for (request, mentions) in cases {
            let response = try #require(try answer(daemon, request), "no answer to \(request.debugDescription)")
            #expect(!response.ok, "\(request.debugDescription)")
            #expect(response.error?.contains(mentions) == true,
                    "\(request.debugDescription) → \(response.error ?? "no error text")")
        }

        // A request line longer than the daemon reads is refused (or the client cut off),
        // never buffered without bound.
        let huge = "{\"command\": \"status\", \"service\": \""
            + String(repeating: "x", count: ControlDefaults.maximumRequestBytes * 2) + "\"}\n"
        if let response = try answer(daemon, huge) { #expect(!response.ok) }
        // A client that sends half a line and goes away.
        let partial = try daemon.connectControl()
        _ = "{\"command\": \"sta".withCString { write(partial, $0, strlen($0)) }
        close(partial)

        #expect(daemon.checkExited() == nil, "the daemon is still running; log:\n\(daemon.log)")
        let after = try daemon.waitForWorkers()
        #expect(after[0].slots.map(\.pid) == before[0].slots.map(\.pid), "no worker was restarted")
        let client = try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0))
        try client.send(Array("still there?".utf8), to: endpoint)
        let reply = try #require(try client.receive(timeoutMs: 10_000))
        #expect(String(decoding: reply, as: UTF8.self).hasSuffix("still there?"))
    }
}
