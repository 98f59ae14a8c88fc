import CReuseportABI

/// A service's QUIC connection-ID steering: the QUIC-LB plaintext layout its workers put in
/// their connection IDs (bpf/dispatch.h, "QUIC connection-ID steering"; docs/quic.md).
///
///     octet 0: config rotation (top 3 bits) | server ID: host prefix, worker ID | the server's own octets
///
/// A value type, checked once in `init`: every instance can be written to rp_quic_config.
public struct QuicSteering: Sendable, Equatable, Hashable, Codable {
    /// Octets of every server connection ID: RP_QUIC_MIN_CID_LENGTH...RP_QUIC_MAX_CID_LENGTH.
    public let cidLength: Int
    /// Octets of the server ID after the first octet: host prefix plus worker ID.
    public let serverIDLength: Int
    /// The server ID's first octets, the same on every worker of this host (empty: none).
    public let hostPrefix: [UInt8]
    /// The top three bits of every CID's first octet: 0...6 (7 means "unroutable").
    public let configRotation: Int

    public static let cidLengthRange = Int(RP_QUIC_MIN_CID_LENGTH)...Int(RP_QUIC_MAX_CID_LENGTH)
    public static let workerIDLengthRange = Int(RP_QUIC_MIN_WORKER_ID_LENGTH)...Int(RP_QUIC_MAX_WORKER_ID_LENGTH)
    public static let prefixLengthRange = 0...Int(RP_QUIC_MAX_PREFIX_LENGTH)
    public static let configRotationRange = 0...Int(RP_QUIC_ROTATION_UNROUTABLE) - 1

    /// Which setting a `Problem` is about, for the configuration's error messages.
    public enum Setting: String, Sendable { case cidLength, serverIDLength, hostPrefix, configRotation }

    /// Why a layout cannot be used, and which setting is at fault.
    public struct Problem: Error, Sendable, CustomStringConvertible {
        public var setting: Setting
        public var description: String
    }

    /// `serverIDLength` nil: the host prefix plus RP_QUIC_MIN_WORKER_ID_LENGTH octets.
    public init(cidLength: Int, serverIDLength: Int? = nil, hostPrefix: [UInt8] = [], configRotation: Int = 0)
        throws(Problem)
    {
        guard Self.cidLengthRange.contains(cidLength) else {
            throw Problem(setting: .cidLength, description: "must be between \(Self.cidLengthRange.lowerBound) and "
                + "\(Self.cidLengthRange.upperBound) octets (RFC 9000 allows at most 20), got \(cidLength)")
        }
        guard Self.prefixLengthRange.contains(hostPrefix.count) else {
            throw Problem(setting: .hostPrefix, description: "is \(hostPrefix.count) octets; at most "
                + "\(Self.prefixLengthRange.upperBound) fit before the worker ID")
        }
        let serverIDLength = serverIDLength ?? hostPrefix.count + Self.workerIDLengthRange.lowerBound
        let workerIDLength = serverIDLength - hostPrefix.count
        guard Self.workerIDLengthRange.contains(workerIDLength) else {
            throw Problem(setting: .serverIDLength, description: "must leave \(Self.workerIDLengthRange.lowerBound) to "
                + "\(Self.workerIDLengthRange.upperBound) octets for the worker ID after a host prefix of "
                + "\(hostPrefix.count) octets, got \(serverIDLength) (a worker ID of \(workerIDLength))")
        }
        let nonce = cidLength - 1 - serverIDLength
        guard nonce >= Int(RP_QUIC_MIN_NONCE_LENGTH) else {
            throw Problem(setting: .serverIDLength, description: "\(serverIDLength) leaves \(nonce) of the "
                + "\(cidLength) octets for the server's own bytes; QUIC-LB needs at least \(RP_QUIC_MIN_NONCE_LENGTH) "
                + "(make cid_length at least \(serverIDLength + 1 + Int(RP_QUIC_MIN_NONCE_LENGTH)))")
        }
        guard Self.configRotationRange.contains(configRotation) else {
            throw Problem(setting: .configRotation, description: "must be between 0 and "
                + "\(Self.configRotationRange.upperBound) (\(RP_QUIC_ROTATION_UNROUTABLE) means unroutable), "
                + "got \(configRotation)")
        }
        self.cidLength = cidLength
        self.serverIDLength = serverIDLength
        self.hostPrefix = hostPrefix
        self.configRotation = configRotation
    }

    /// The worker ID's octets.
    public var workerIDLength: Int { serverIDLength - hostPrefix.count }

    /// rp_config.quic as the program reads it.
    public var config: rp_quic_config {
        rp_quic_config(enabled: 1, host_prefix: hostPrefix.reduce(0) { $0 << 8 | UInt32($1) },
                       cid_length: UInt8(cidLength), server_id_length: UInt8(serverIDLength),
                       prefix_length: UInt8(hostPrefix.count), config_rotation: UInt8(configRotation), reserved: 0)
    }

    /// Reads back what rp_config.quic holds; nil when steering is off (or the entry is not a
    /// layout this build accepts).
    public init?(_ config: rp_quic_config) {
        guard config.enabled != 0 else { return nil }
        let prefixLength = Int(config.prefix_length)
        guard prefixLength <= 4 else { return nil }
        let prefix = (0..<prefixLength).map { UInt8(truncatingIfNeeded: config.host_prefix >> (8 * UInt32(prefixLength - 1 - $0))) }
        guard let value = try? QuicSteering(cidLength: Int(config.cid_length),
                                            serverIDLength: Int(config.server_id_length), hostPrefix: prefix,
                                            configRotation: Int(config.config_rotation))
        else { return nil }
        self = value
    }

    /// The server ID of `slot`'s workers: host prefix, then the worker ID big-endian.
    public func serverID(slot: UInt32) -> [UInt8] {
        let worker = rp_quic_worker_id(slot)
        return hostPrefix + (0..<workerIDLength).map { UInt8(truncatingIfNeeded: worker >> (8 * UInt32(workerIDLength - 1 - $0))) }
    }

    /// The first octet of this layout's CIDs with `low` in its 5 free bits.
    public func firstOctet(low: UInt8 = 0) -> UInt8 { UInt8(configRotation) << 5 | (low & 0x1f) }

    /// A connection ID that `slot`'s workers could issue: first octet, server ID, then `nonce`
    /// (cidLength - 1 - serverIDLength octets, zeros when nil).
    public func connectionID(slot: UInt32, nonce: [UInt8]? = nil) -> [UInt8] {
        let own = nonce ?? [UInt8](repeating: 0, count: cidLength - 1 - serverIDLength)
        precondition(own.count == cidLength - 1 - serverIDLength, "a CID of \(cidLength) octets")
        return [firstOctet()] + serverID(slot: slot) + own
    }

    /// The slot a CID names under this layout (rp_quic_server_slot of bpf/dispatch.h), or nil
    /// when it is not a CID of this layout.
    public func slot(ofCID cid: [UInt8]) -> UInt32? {
        var window = cid + [UInt8](repeating: 0, count: max(0, 1 + Int(RP_QUIC_MAX_SERVER_ID_LENGTH) - cid.count))
        var value = config
        let slot = window.withUnsafeMutableBufferPointer { rp_quic_server_slot(&value, $0.baseAddress) }
        return slot == RP_QUIC_NO_SLOT ? nil : slot
    }
}

/// A QUIC packet's header as the program classifies it (rp_quic_parse of bpf/dispatch.h).
public struct QuicHeader: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case short, long, versionNegotiation, unparsable }
    public var kind: Kind
    public var isInitial: Bool
    public var dcid: [UInt8]

    /// Classifies a UDP payload as the program does, from the octets it reads.
    public init(payload: [UInt8], steering: QuicSteering) {
        var head = [UInt8](repeating: 0, count: Int(RP_QUIC_HEADER_BYTES))
        let loaded = payload.count >= Int(RP_QUIC_HEADER_BYTES) ? Int(RP_QUIC_HEADER_BYTES)
            : payload.count >= Int(RP_QUIC_SHORT_HEADER_BYTES) ? Int(RP_QUIC_SHORT_HEADER_BYTES) : 0
        head.replaceSubrange(0..<loaded, with: payload[0..<loaded])
        var config = steering.config
        var header = rp_quic_header()
        rp_quic_parse(&config, head, UInt32(payload.count), &header)
        switch header.kind {
        case UInt32(RP_QUIC_SHORT.rawValue): kind = .short
        case UInt32(RP_QUIC_LONG.rawValue): kind = .long
        case UInt32(RP_QUIC_VERSION_NEGOTIATION.rawValue): kind = .versionNegotiation
        default: kind = .unparsable
        }
        isInitial = header.initial != 0
        let start = kind == .short ? 1 : 6
        dcid = kind == .short || kind == .long ? Array(payload[start..<start + Int(header.dcid_length)]) : []
    }

    /// The hash a long header is steered by when its DCID names no live slot (rp_quic_dcid_hash).
    public static func dcidHash(_ dcid: [UInt8], seed: UInt32) -> UInt32 {
        let padded = dcid + [UInt8](repeating: 0, count: max(0, Int(RP_QUIC_MIN_CID_LENGTH) - dcid.count))
        return rp_quic_dcid_hash(seed, padded, UInt32(dcid.count))
    }

    /// A long-header QUIC v1 Initial carrying `dcid`, padded to 1200 octets (as clients send them).
    public static func initial(dcid: [UInt8], scid: [UInt8] = []) -> [UInt8] {
        var packet: [UInt8] = [0xc0, 0, 0, 0, 1, UInt8(dcid.count)] + dcid + [UInt8(scid.count)] + scid
        packet += [UInt8](repeating: 0, count: 1200 - packet.count)
        return packet
    }

    /// A short-header packet carrying `dcid`, then `body` (default: 40 octets of zeros).
    public static func short(dcid: [UInt8], body: [UInt8] = [UInt8](repeating: 0, count: 40)) -> [UInt8] {
        [0x40] + dcid + body
    }
}

extension QuicSteering {
    /// Parses hex ("0a1b", "0x0a1b"; ':' and '-' between octets allowed) into octets.
    public static func octets(hex text: String) -> [UInt8]? {
        var digits = Substring(text)
        if digits.hasPrefix("0x") || digits.hasPrefix("0X") { digits = digits.dropFirst(2) }
        let clean = digits.filter { $0 != ":" && $0 != "-" }
        guard clean.count % 2 == 0 else { return nil }
        var result: [UInt8] = []
        var index = clean.startIndex
        while index < clean.endIndex {
            let next = clean.index(index, offsetBy: 2)
            guard let octet = UInt8(clean[index..<next], radix: 16) else { return nil }
            result.append(octet)
            index = next
        }
        return result
    }

    /// Octets as lowercase hex, as the workers' environment carries them.
    public static func hex(_ octets: [UInt8]) -> String {
        octets.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
