#if canImport(Glibc)
import Glibc
#endif
import CReuseportBench
import Synchronization

/// Seconds on CLOCK_MONOTONIC.
func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Sleeps for `seconds` (nanosleep, resumed after signals).
func pause(_ seconds: Double) {
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// The CPUs this process may run on (sched_getaffinity), in order.
func allowedCPUs() -> [Int] {
    var set = cpu_set_t()
    guard sched_getaffinity(0, MemoryLayout<cpu_set_t>.size, &set) == 0 else { return [0] }
    return withUnsafeBytes(of: &set) { raw in
        (0..<(raw.count * 8)).filter { raw[$0 / 8] & (1 << ($0 % 8)) != 0 }
    }
}

/// Pins the calling thread to one CPU (sched_setaffinity on the thread, not the process).
func pinCurrentThread(to cpu: Int) {
    var set = cpu_set_t()
    withUnsafeMutableBytes(of: &set) { $0[cpu / 8] |= UInt8(1 << (cpu % 8)) }
    if sched_setaffinity(0, MemoryLayout<cpu_set_t>.size, &set) != 0 {
        Log.note("sched_setaffinity(cpu \(cpu)): \(String(cString: strerror(errno))); running unpinned")
    }
}

/// CPU time of the calling thread: user and system seconds (getrusage(RUSAGE_THREAD)).
func threadCPUTime() -> (user: Double, system: Double) {
    var usage = rusage()
    getrusage(__rusage_who_t(rp_bench_RUSAGE_THREAD), &usage)
    func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
    return (seconds(usage.ru_utime), seconds(usage.ru_stime))
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
        var line = text + "\n"
        line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }
}
