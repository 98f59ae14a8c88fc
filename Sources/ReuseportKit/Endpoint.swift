#if canImport(Glibc)
import Glibc
#endif

/// The transport of a listener.
public enum Transport: String, Sendable, Hashable, CaseIterable, Codable {
    case udp, tcp

    /// SOCK_DGRAM or SOCK_STREAM, for socket(2).
    public var socketType: Int32 { self == .udp ? Int32(SOCK_DGRAM.rawValue) : Int32(SOCK_STREAM.rawValue) }
    /// The IP protocol number, as the BPF program sees it in `ctx->ip_protocol`.
    public var ipProtocol: UInt8 { self == .udp ? UInt8(IPPROTO_UDP) : UInt8(IPPROTO_TCP) }
}

/// An IPv4 or IPv6 address, kept as its bytes in network order.
public struct IPAddress: Hashable, Sendable, CustomStringConvertible, Codable {
    /// 4 bytes for IPv4, 16 for IPv6.
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    /// Parses dotted IPv4 or textual IPv6 (without brackets).
    public init?(_ text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
        } else {
            return nil
        }
    }

    public static let loopbackV4 = IPAddress("127.0.0.1")!
    public static let loopbackV6 = IPAddress("::1")!

    public var isV4: Bool { bytes.count == 4 }
    public var family: Int32 { isV4 ? AF_INET : AF_INET6 }
    public var isWildcard: Bool { bytes.allSatisfy { $0 == 0 } }

    /// `::ffff:a.b.c.d` as the IPv4 address a.b.c.d, which is what such a client sends on
    /// the wire; any other address unchanged.
    public var unmapped: IPAddress {
        guard bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xff, bytes[11] == 0xff
        else { return self }
        return IPAddress(bytes: Array(bytes[12...]))!
    }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        return bytes.withUnsafeBytes { raw in
            inet_ntop(family, raw.baseAddress, &buffer, socklen_t(buffer.count))
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let address = IPAddress(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not an IP address: \(text)"))
        }
        self = address
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An address and port, as `ADDR:PORT` or `[ADDR6]:PORT`.
public struct SocketAddress: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16

    public init(_ address: IPAddress, _ port: UInt16) {
        self.address = address
        self.port = port
    }

    /// Parses `1.2.3.4:53`, `[::1]:53`, or (IPv6 without port ambiguity) `[::1]:53` only.
    public init(parsing text: String) throws {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw ReuseportError.invalidArgument("'\(text)': expected [IPv6]:PORT")
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else {
                throw ReuseportError.invalidArgument(
                    "'\(text)': expected ADDR:PORT (IPv6 in brackets, e.g. [::1]:5300)")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard let address = IPAddress(String(host)) else {
            throw ReuseportError.invalidArgument("'\(text)': '\(host)' is not an IPv4 or IPv6 address")
        }
        guard let port = UInt16(portText) else {
            throw ReuseportError.invalidArgument("'\(text)': '\(portText)' is not a port (0-65535)")
        }
        self.init(address, port)
    }

    public var description: String {
        address.isV4 ? "\(address):\(port)" : "[\(address)]:\(port)"
    }

    /// Calls `body` with this address as a `sockaddr`.
    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        if address.isV4 {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin.sin_addr) { $0.copyBytes(from: address.bytes) }
            return try withUnsafePointer(to: &sin) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &sin6.sin6_addr) { $0.copyBytes(from: address.bytes) }
        return try withUnsafePointer(to: &sin6) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                try body($0, socklen_t(MemoryLayout<sockaddr_in6>.size))
            }
        }
    }

    /// Reads a `sockaddr_in` or `sockaddr_in6`; nil for other families.
    public init?(storage: sockaddr_storage) {
        var storage = storage
        switch Int32(storage.ss_family) {
        case AF_INET:
            let sin = withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in.self) }
            let bytes = withUnsafeBytes(of: sin.sin_addr) { Array($0) }
            self.init(IPAddress(bytes: bytes)!, UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = withUnsafeBytes(of: &storage) { $0.load(as: sockaddr_in6.self) }
            let bytes = withUnsafeBytes(of: sin6.sin6_addr) { Array($0) }
            self.init(IPAddress(bytes: bytes)!, UInt16(bigEndian: sin6.sin6_port))
        default:
            return nil
        }
    }
}

/// A listener's address: `udp://127.0.0.1:5300`, `tcp://[::]:443`.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var transport: Transport
    public var address: SocketAddress

    public init(_ transport: Transport, _ address: SocketAddress) {
        self.transport = transport
        self.address = address
    }

    public init(parsing text: String) throws {
        let parts = text.split(separator: "://", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else {
            throw ReuseportError.invalidArgument("'\(text)': expected udp://ADDR:PORT or tcp://ADDR:PORT")
        }
        let scheme = String(parts[0])
        guard let transport = Transport(rawValue: scheme) else {
            throw ReuseportError.invalidArgument("'\(text)': unknown scheme '\(scheme)' (use udp or tcp)")
        }
        let rest = String(parts[1])
        do {
            self.init(transport, try SocketAddress(parsing: rest))
        } catch ReuseportError.invalidArgument(let why) {
            throw ReuseportError.invalidArgument("'\(text)': \(why)")
        }
    }

    public var description: String { "\(transport)://\(address)" }
}

/// As its text, `udp://127.0.0.1:5300`.
extension Endpoint: Codable {
    public init(from decoder: Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do {
            try self.init(parsing: text)
        } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "\(error)"))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
