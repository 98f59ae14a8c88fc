import Foundation
import Testing

/// Runs a suite's tests on threads of the harness's own, `REUSEPORT_TEST_THREADS` of them (4 by
/// default), instead of Swift Testing's default executor.
///
/// The daemon and kernel tests block: in `poll` for an answer, in `waitpid`, in sleeps between
/// samples. Swift Testing runs every test on the global concurrent executor, whose width on Linux
/// is the CPU count, so on a 2-CPU machine two blocked tests held the whole suite while the CPUs
/// stayed mostly idle (a full `swift test` used about a third of them). A test body that blocks
/// here blocks one of these threads; the tests that compute run beside them.
///
/// A suite that must not overlap its own tests still says `.serialized`: that trait orders the
/// tests, this one only chooses their threads. A test that must have the CPUs to itself (one that
/// counts losses under sustained load) says `.alone` as well: it waits until the tests running
/// beside it end, and none starts beside it.
public struct TestThreads: SuiteTrait, TestTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        guard testCase != nil else { return try await function() }
        let alone = test.traits.contains { $0 is Alone }
        await TestThreadPool.turns.begin(alone: alone)
        do {
            try await withTaskExecutorPreference(TestThreadPool.shared) { try await function() }
        } catch {
            await TestThreadPool.turns.end(alone: alone)
            throw error
        }
        await TestThreadPool.turns.end(alone: alone)
    }
}

/// Marks a test of a suite on `.onTestThreads` that runs with no other such test beside it.
public struct Alone: TestTrait {}

extension Trait where Self == Alone {
    /// The test runs with no other test of the harness's threads beside it (`TestThreads`).
    public static var alone: Self { Alone() }
}

/// Who runs: any number of tests, or one test alone. A test that waits to run alone holds back
/// the tests that come after it, so it is not starved.
actor TestTurns {
    private var running = 0
    private var aloneRunning = false
    private var waitingAlone: [CheckedContinuation<Void, Never>] = []
    private var waitingShared: [CheckedContinuation<Void, Never>] = []

    func begin(alone: Bool) async {
        if alone {
            if aloneRunning || running > 0 || !waitingAlone.isEmpty {
                await withCheckedContinuation { waitingAlone.append($0) }
            } else {
                aloneRunning = true
            }
        } else if aloneRunning || !waitingAlone.isEmpty {
            await withCheckedContinuation { waitingShared.append($0) }
        } else {
            running += 1
        }
    }

    func end(alone: Bool) {
        if alone { aloneRunning = false } else { running -= 1 }
        guard !aloneRunning, running == 0 else { return }
        if !waitingAlone.isEmpty {
            // The next test alone; whoever begins meanwhile waits behind it.
            aloneRunning = true
            waitingAlone.removeFirst().resume()
        } else {
            running = waitingShared.count
            for waiting in waitingShared { waiting.resume() }
            waitingShared.removeAll()
        }
    }
}

extension Trait where Self == TestThreads {
    /// The suite's tests run on the harness's own threads (`TestThreads`).
    public static var onTestThreads: Self { TestThreads() }
}

/// A fixed set of threads that run the jobs of tasks preferring it, first in, first out.
final class TestThreadPool: TaskExecutor, @unchecked Sendable {
    /// `REUSEPORT_TEST_THREADS`: how many tests may block at once.
    static let shared = TestThreadPool(
        threads: ProcessInfo.processInfo.environment["REUSEPORT_TEST_THREADS"].flatMap { Int($0) }.map { max($0, 1) }
            ?? 4)

    /// Whose turn it is: every test on these threads, or one alone.
    static let turns = TestTurns()

    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []

    private init(threads: Int) {
        for index in 0..<threads {
            let thread = Thread { [unowned self] in self.run() }
            thread.name = "test-\(index)"
            // As the default executor's threads: some tests keep large values on the stack.
            thread.stackSize = 8 << 20
            thread.start()
        }
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while jobs.isEmpty { condition.wait() }
            let job = jobs.removeFirst()
            condition.unlock()
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
    }
}
