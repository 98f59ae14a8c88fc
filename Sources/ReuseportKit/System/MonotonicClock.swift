#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC: for timers, deadlines and durations (never goes back, stops in suspend).
public enum MonotonicClock {
    public static func nanoseconds() -> Int64 { read(CLOCK_MONOTONIC) }
    public static func milliseconds() -> Int { Int(nanoseconds() / 1_000_000) }
    public static func seconds() -> Double { Double(nanoseconds()) / 1e9 }
    /// CLOCK_MONOTONIC_COARSE: the same clock as of the last tick (what bpf_ktime_get_coarse_ns() reads).
    public static func coarseNanoseconds() -> Int64 { read(CLOCK_MONOTONIC_COARSE) }

    /// clock_gettime(2); it cannot fail for a clock the kernel always has.
    static func read(_ clock: clockid_t) -> Int64 {
        var time = timespec()
        clock_gettime(clock, &time)
        return Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec)
    }
}

/// CLOCK_REALTIME: for what is published to people and other processes (`rp_slot_state.since_ns`).
public enum WallClock {
    public static func nanoseconds() -> UInt64 { UInt64(MonotonicClock.read(CLOCK_REALTIME)) }
}
