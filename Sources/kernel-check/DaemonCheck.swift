import ReuseportKit

/// The daemon end to end: start reuseportd with whoami workers, kill a worker, every flow
/// keeps its slot.
enum DaemonCheck {
    static let all: [Check] = [endToEnd]

    static let endToEnd = Check(
        "daemon-end-to-end",
        "reuseportd with whoami workers: after a worker is killed every flow keeps its slot"
    ) { _ in
        throw CheckSkip(description: "reuseportd is not built yet (the daemon has not landed)")
    }
}
