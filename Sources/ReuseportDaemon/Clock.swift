#if canImport(Glibc)
import Glibc
#endif

/// Time as the supervisor uses it: monotonic nanoseconds for timers, wall-clock
/// nanoseconds for what it publishes (`rp_slot_state.since_ns`).
enum Clock {
    static func monotonicNs() -> Int64 { read(CLOCK_MONOTONIC) }
    static func realtimeNs() -> UInt64 { UInt64(read(CLOCK_REALTIME)) }

    private static func read(_ clock: clockid_t) -> Int64 {
        var time = timespec()
        clock_gettime(clock, &time)
        return Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec)
    }
}

extension Int {
    /// Milliseconds as nanoseconds.
    var msAsNs: Int64 { Int64(self) * 1_000_000 }
}
