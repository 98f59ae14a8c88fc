#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit

/// Worker threads that read datagrams (recvmmsg(2), 64 at a time) from a set of sockets
/// until stopped, and count them.
///
/// With at least as many threads as sockets, thread i polls socket i mod count (N threads
/// on one socket is the classic single-socket server) without ever sleeping in the kernel:
/// a sleeping reader makes the sender pay a cross-CPU wakeup (an IPI, and a VM exit on a
/// virtual machine) for nearly every datagram, and that, not the delivery path, would set
/// the rate. An empty socket yields the CPU (sched_yield) to the other readers instead.
/// With fewer threads than sockets (up to 1024 sockets), each thread waits on its share
/// with epoll: those runs count program run times, not rates.
final class ReceiverGroup {
    private let stopFlag = StopFlag()
    private var threads: [PinnedThread] = []
    private let counts: UnsafeMutablePointer<UInt64>
    private let busy: UnsafeMutablePointer<Double>
    let fds: [Int32]
    let threadCount: Int

    /// Starts `threads` readers on `cpu` (nil: unpinned).
    init(fds: [Int32], threads threadCount: Int, cpu: Int?) {
        self.fds = fds
        self.threadCount = threadCount
        counts = .allocate(capacity: max(fds.count, threadCount))
        counts.initialize(repeating: 0, count: max(fds.count, threadCount))
        busy = .allocate(capacity: threadCount)
        busy.initialize(repeating: 0, count: threadCount)
        for fd in fds {
            try? Syscall.setOption(fd, SOL_SOCKET, SO_RCVTIMEO, timeval(tv_sec: 0, tv_usec: 10_000), "SO_RCVTIMEO")
        }
        for index in 0..<threadCount {
            let mine = threadCount >= fds.count
                ? [index % fds.count]
                : Array(stride(from: index, to: fds.count, by: threadCount))
            let counts = counts
            let busy = busy
            let stop = stopFlag
            let fds = fds
            let single = threadCount >= fds.count
            threads.append(PinnedThread(cpu: cpu) {
                let before = threadCPUTime()
                if single {
                    counts[index] = Self.drainPolling(fds[mine[0]], stop: stop)
                } else {
                    Self.drainWaiting(fds, mine, counts: counts, stop: stop)
                }
                let after = threadCPUTime()
                busy[index] = after.user + after.system - before.user - before.system
            })
        }
    }

    deinit {
        counts.deallocate()
        busy.deallocate()
    }

    /// Stops the readers once their sockets are drained. Returns datagrams per thread
    /// (one thread per socket or more) or per socket (fewer threads than sockets), and the
    /// readers' CPU seconds in all.
    func stop() -> (counts: [UInt64], cpuSeconds: Double) {
        stopFlag.raise()
        for thread in threads { thread.join() }
        let n = threadCount >= fds.count ? threadCount : fds.count
        return (Array(UnsafeBufferPointer(start: counts, count: n)),
                UnsafeBufferPointer(start: busy, count: threadCount).reduce(0, +))
    }

    static let batch = 64
    static let bufferSize = 2048

    /// Buffers for one recvmmsg of `batch` datagrams.
    final class Batch {
        let messages: UnsafeMutablePointer<rp_bench_mmsghdr>
        let iovecs: UnsafeMutablePointer<iovec>
        let storage: UnsafeMutableRawPointer

        init() {
            messages = .allocate(capacity: ReceiverGroup.batch)
            iovecs = .allocate(capacity: ReceiverGroup.batch)
            storage = .allocate(byteCount: ReceiverGroup.batch * ReceiverGroup.bufferSize, alignment: 64)
            for i in 0..<ReceiverGroup.batch {
                iovecs[i] = iovec(iov_base: storage + i * ReceiverGroup.bufferSize, iov_len: ReceiverGroup.bufferSize)
                var header = msghdr()
                header.msg_iov = iovecs + i
                header.msg_iovlen = 1
                messages[i] = rp_bench_mmsghdr(msg_hdr: header, msg_len: 0)
            }
        }

        deinit {
            messages.deallocate()
            iovecs.deallocate()
            storage.deallocate()
        }

        func receive(_ fd: Int32, flags: Int32) -> Int32 {
            rp_bench_recvmmsg(fd, messages, UInt32(ReceiverGroup.batch), flags)
        }
    }

    /// Polls one socket until stopped and empty.
    static func drainPolling(_ fd: Int32, stop: StopFlag) -> UInt64 {
        let batch = Batch()
        var total: UInt64 = 0
        while true {
            let got = batch.receive(fd, flags: rp_bench_MSG_DONTWAIT)
            if got > 0 {
                total += UInt64(got)
            } else if stop.isRaised {
                return total
            } else {
                sched_yield()
            }
        }
    }

    /// Waits on several sockets with epoll, draining each that is readable.
    static func drainWaiting(_ fds: [Int32], _ mine: [Int], counts: UnsafeMutablePointer<UInt64>, stop: StopFlag) {
        guard let epoll = try? EpollSet(mine.map { fds[$0] }) else { return }
        let batch = Batch()
        while true {
            let ready = epoll.wait(timeoutMs: 10)
            if ready.isEmpty && stop.isRaised { return }
            for member in ready {
                let index = mine[member]
                while true {
                    let got = batch.receive(fds[index], flags: rp_bench_MSG_DONTWAIT)
                    if got <= 0 { break }
                    counts[index] += UInt64(got)
                }
            }
        }
    }
}
