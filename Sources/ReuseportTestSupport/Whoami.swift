#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit

/// A whoami answer (reuseportd's built-in worker, `reuseportd worker whoami`):
/// `slot=<slot> pid=<pid> service=<name> peer=<addr>:<port>[ truncated=<n>]\n<payload>`.
public struct WhoamiReply: Equatable, Sendable {
    public var slot: UInt32
    public var pid: Int32
    public var service: String
    public var peer: String
    /// The datagram the worker answered, echoed (its start only when `truncated` > 0).
    public var payload: [UInt8]
    /// Bytes of the datagram left out of `payload` so that the answer fits one datagram; 0 when none.
    public var truncated: Int
    /// Fields other workers in this format add (the upgrade tests' worker: `version`, `generation`).
    public var extra: [String: String]

    public init?(_ received: some Collection<UInt8>) {
        let bytes = Array(received)
        guard let newline = bytes.firstIndex(of: 0x0a) else { return nil }
        let header = String(decoding: bytes[..<newline], as: UTF8.self)
        var fields: [String: String] = [:]
        for part in header.split(separator: " ") {
            guard let equals = part.firstIndex(of: "=") else { return nil }
            fields[String(part[..<equals])] = String(part[part.index(after: equals)...])
        }
        guard let slot = fields["slot"].flatMap({ UInt32($0) }), let pid = fields["pid"].flatMap({ Int32($0) }),
              let service = fields["service"], let peer = fields["peer"]
        else { return nil }
        guard let truncated = fields["truncated"].map({ Int($0) }) ?? 0 else { return nil }
        self.truncated = truncated
        extra = fields.filter { !["slot", "pid", "service", "peer", "truncated"].contains($0.key) }
        self.slot = slot
        self.pid = pid
        self.service = service
        self.peer = peer
        payload = Array(bytes[(newline + 1)...])
    }
}

public enum Whoami {
    /// Sends one datagram from each client (`payload(index)`, default `probe <index>`) and
    /// returns the whoami answer each got, by client index. A client still without an answer
    /// after `timeoutMs` is asked again, up to `attempts` times in all.
    public static func ask(_ clients: [FlowClient], to destination: SocketAddress, attempts: Int = 3,
                           timeoutMs: Int = 2000, payload: (Int) -> [UInt8] = { Array("probe \($0)".utf8) })
        throws -> [WhoamiReply?]
    {
        var replies = [WhoamiReply?](repeating: nil, count: clients.count)
        for _ in 0..<attempts {
            let missing = replies.indices.filter { replies[$0] == nil }
            if missing.isEmpty { break }
            for index in missing { try clients[index].send(payload(index), to: destination) }
            let deadline = nowMs() + Double(timeoutMs)
            var pending = missing
            while !pending.isEmpty && nowMs() < deadline {
                let ready = try Syscall.poll(pending.map { clients[$0].descriptor.fd }, timeoutMs: 100)
                for index in pending where ready.contains(clients[index].descriptor.fd) {
                    while let bytes = try clients[index].receive(timeoutMs: 0) {
                        if replies[index] == nil, let reply = WhoamiReply(bytes) { replies[index] = reply }
                    }
                }
                pending.removeAll { replies[$0] != nil }
            }
        }
        return replies
    }
}
