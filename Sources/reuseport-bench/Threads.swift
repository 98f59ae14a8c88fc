#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import ReuseportKit
import Synchronization

/// Sleeps for `seconds` (nanosleep, resumed after signals).
func pause(_ seconds: Double) {
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// The CPUs this process may run on (sched_getaffinity), in order.
func allowedCPUs() -> [Int] {
    var mask = [UInt8](repeating: 0, count: 128)
    guard rp_bench_allowed_cpus(&mask, mask.count) == 0 else { return [0] }
    return (0..<(mask.count * 8)).filter { mask[$0 / 8] & (1 << ($0 % 8)) != 0 }
}

/// Pins the calling thread to one CPU (sched_setaffinity on the thread, not the process).
func pinCurrentThread(to cpu: Int) {
    if rp_bench_pin_thread(Int32(cpu)) != 0 {
        Log.note("sched_setaffinity(cpu \(cpu)): \(String(cString: strerror(errno))); running unpinned")
    }
}

/// CPU time of the calling thread: user and system seconds (getrusage(RUSAGE_THREAD)).
func threadCPUTime() -> (user: Double, system: Double) {
    var user: Int64 = 0
    var system: Int64 = 0
    rp_bench_thread_cpu_us(&user, &system)
    return (Double(user) / 1e6, Double(system) / 1e6)
}

/// A POSIX thread, optionally pinned to a CPU, joined explicitly. The benchmarks use
/// threads rather than tasks so that each sender and receiver owns its CPU placement.
final class PinnedThread {
    private final class Start {
        let cpu: Int?
        let body: () -> Void
        init(cpu: Int?, body: @escaping () -> Void) {
            self.cpu = cpu
            self.body = body
        }
    }

    private var thread = pthread_t()

    init(cpu: Int?, _ body: @escaping () -> Void) {
        let start = Unmanaged.passRetained(Start(cpu: cpu, body: body)).toOpaque()
        let result = pthread_create(&thread, nil, { argument in
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            if let cpu = start.cpu { pinCurrentThread(to: cpu) }
            start.body()
            return nil
        }, start)
        precondition(result == 0, "pthread_create: \(result)")
    }

    func join() { pthread_join(thread, nil) }
}

/// A flag one thread raises and others poll.
final class StopFlag: Sendable {
    private let raised = Atomic<Bool>(false)
    var isRaised: Bool { raised.load(ordering: .acquiring) }
    func raise() { raised.store(true, ordering: .releasing) }
}

/// Progress lines on standard error (the report goes to the file).
enum Log {
    static func note(_ text: String) {
        try? Array((text + "\n").utf8).withUnsafeBytes { try Syscall.writeAll(.standardError, $0, "write(stderr)") }
    }
}
