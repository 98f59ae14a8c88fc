import CReuseportABI

/// A slot's worker state, as the daemon records it in rp_slot_state
/// (`enum rp_worker_state` in bpf/dispatch.h).
public struct WorkerState: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32

    public init(rawValue: UInt32) { self.rawValue = rawValue }
    init(_ state: rp_worker_state) { rawValue = state.rawValue }

    public static let empty = WorkerState(RP_WORKER_EMPTY)
    public static let starting = WorkerState(RP_WORKER_STARTING)
    public static let running = WorkerState(RP_WORKER_RUNNING)
    public static let backoff = WorkerState(RP_WORKER_BACKOFF)
    public static let failedOver = WorkerState(RP_WORKER_FAILED_OVER)
    public static let stopping = WorkerState(RP_WORKER_STOPPING)
    /// Alive, but its receive queue stays full while the kernel drops datagrams at it.
    public static let stalled = WorkerState(RP_WORKER_STALLED)

    public static let all: [WorkerState] = [.empty, .starting, .running, .backoff, .failedOver, .stopping, .stalled]

    /// The name reuseportctl shows and the JSON carries.
    public var description: String {
        switch self {
        case .empty: "empty"
        case .starting: "starting"
        case .running: "running"
        case .backoff: "backoff"
        case .failedOver: "failed-over"
        case .stopping: "stopping"
        case .stalled: "stalled"
        default: "unknown(\(rawValue))"
        }
    }
}
