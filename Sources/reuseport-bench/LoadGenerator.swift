#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit

/// Errors of the benchmark's own socket work, naming the call.
struct BenchError: Error, CustomStringConvertible {
    var description: String

    init(_ text: String) { description = text }

    static func system(_ call: String, _ code: Int32 = errno) -> BenchError {
        BenchError("\(call): \(String(cString: strerror(code))) (errno \(code))")
    }
}

/// A socket address in a stable heap buffer, for msghdr.msg_name.
final class SockaddrBuffer {
    let pointer: UnsafeMutableRawPointer
    let length: socklen_t

    init(_ address: SocketAddress) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<sockaddr_storage>.size, alignment: 8)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<sockaddr_storage>.size)
        length = address.withSockaddr { source, length in
            buffer.copyMemory(from: source, byteCount: Int(length))
            return length
        }
        pointer = buffer
    }

    deinit { pointer.deallocate() }
}

/// The load generator's flows: one UDP socket per flow, each bound to its own source
/// port on a loopback address, unconnected (the destination is given per message, so
/// one set of flows serves every receiver group of a run).
final class FlowSet {
    private let descriptors: [OwnedDescriptor]
    /// The sockets' numbers, for the calls in CReuseportBench; valid while this set lives.
    let fds: [Int32]
    let sources: [SocketAddress]

    /// `count` sockets bound to `address`, kernel-chosen ports; with `accept`, only sources it
    /// accepts are kept (the others are closed and replaced), within 100 × `count` tries.
    init(count: Int, address: IPAddress, accept: (SocketAddress) -> Bool = { _ in true }) throws {
        let local = SocketAddress(address, 0)
        // Each closed by its owner if a later one fails.
        var kept: [(OwnedDescriptor, SocketAddress)] = []
        var tries = 0
        while kept.count < count {
            tries += 1
            guard tries <= 100 * count else { throw BenchError("no \(count) source ports pass the filter") }
            let descriptor = try Syscall.socket(address.family, Int32(SOCK_DGRAM.rawValue), "udp")
            try Syscall.bind(descriptor.fd, local, "\(local)")
            let source = try Syscall.localAddress(descriptor.fd, "\(local)")!
            if accept(source) { kept.append((descriptor, source)) }
        }
        descriptors = kept.map(\.0)
        sources = kept.map(\.1)
        fds = descriptors.map { $0.fd.rawValue }
    }
}

/// What one sender run did.
struct SendResult {
    var sent = 0
    var failedCalls = 0
    var seconds = 0.0
    /// CPU time of the sending thread: user space (the generator's own work) and kernel
    /// (send path, and on loopback the whole receive path up to the socket queue).
    var userSeconds = 0.0
    var systemSeconds = 0.0

    var rate: Double { seconds > 0 ? Double(sent) / seconds : 0 }
    /// Datagrams per second of the sending thread's own CPU time: what the rate would be
    /// if the thread had its CPU to itself (on a shared machine it does not).
    var ratePerCPUSecond: Double { userSeconds + systemSeconds > 0 ? Double(sent) / (userSeconds + systemSeconds) : 0 }
    var userShare: Double { userSeconds + systemSeconds > 0 ? userSeconds / (userSeconds + systemSeconds) : 0 }
}

/// Sends as fast as it can for `seconds`: sendmmsg(2) with `batch` datagrams of
/// `payloadSize` bytes from each flow in turn, so every flow sends the same share.
func blast(from flows: FlowSet, to destination: SocketAddress, seconds: Double, batch: Int = 32,
           payloadSize: Int = 64, payload content: [UInt8]? = nil) -> SendResult
{
    let name = SockaddrBuffer(destination)
    let payloadSize = content?.count ?? payloadSize
    let payload = UnsafeMutableRawPointer.allocate(byteCount: payloadSize, alignment: 8)
    payload.initializeMemory(as: UInt8.self, repeating: 0x5a, count: payloadSize)
    if let content { payload.copyMemory(from: content, byteCount: content.count) }
    defer { payload.deallocate() }
    let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
    iov.initialize(to: iovec(iov_base: payload, iov_len: payloadSize))
    defer { iov.deallocate() }
    let messages = UnsafeMutablePointer<rp_bench_mmsghdr>.allocate(capacity: batch)
    defer { messages.deallocate() }
    for i in 0..<batch {
        var header = msghdr()
        header.msg_name = name.pointer
        header.msg_namelen = name.length
        header.msg_iov = iov
        header.msg_iovlen = 1
        messages[i] = rp_bench_mmsghdr(msg_hdr: header, msg_len: 0)
    }
    var result = SendResult()
    let cpuBefore = threadCPUTime()
    let start = MonotonicClock.seconds()
    var end = start
    var index = 0
    while end - start < seconds {
        let sent = rp_bench_sendmmsg(flows.fds[index], messages, UInt32(batch), 0)
        if sent > 0 { result.sent += Int(sent) } else { result.failedCalls += 1 }
        index = index + 1 == flows.fds.count ? 0 : index + 1
        end = MonotonicClock.seconds()
    }
    let cpuAfter = threadCPUTime()
    result.seconds = end - start
    result.userSeconds = cpuAfter.user - cpuBefore.user
    result.systemSeconds = cpuAfter.system - cpuBefore.system
    return result
}

/// One datagram of 64 octets from every flow, in order: unlike `blast`, which starts from the
/// first flow each time, so that on a busy machine a short trial may never reach the last ones.
/// Returns how many were sent.
@discardableResult
func sendEach(from flows: FlowSet, to destination: SocketAddress) -> Int {
    let name = SockaddrBuffer(destination)
    let payload = [UInt8](repeating: 0x5a, count: 64)
    return flows.fds.reduce(0) { sent, fd in
        payload.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, name.pointer.assumingMemoryBound(to: sockaddr.self), name.length) } == 64 ? sent + 1 : sent
    }
}
