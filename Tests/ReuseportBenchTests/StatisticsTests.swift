import Testing
import ReuseportTestSupport
@testable import reuseport_bench

/// The arithmetic behind docs/benchmarks.md: quantiles, ratios, orderings, shares.
struct StatisticsTests {
    @Test func summaryOfRepeats() throws {
        let summary = try #require(Summary([5, 1, 4, 2, 3]))
        #expect(summary.count == 5)
        #expect(summary.median == 3)
        #expect(summary.min == 1 && summary.max == 5)
        #expect(summary.q1 == 2 && summary.q3 == 4)
    }

    @Test func medianOfAnEvenCountInterpolates() throws {
        #expect(try #require(Summary([1, 2, 3, 10])).median == 2.5)
        #expect(Summary.quantile([0, 10], 0.25) == 2.5)
    }

    @Test func emptyOrNonFiniteGivesNoSummary() throws {
        #expect(Summary([]) == nil)
        #expect(Summary([.nan, .infinity]) == nil)
        #expect(try #require(Summary([.nan, 7])).median == 7)
    }

    @Test func ratiosPairRepeatsAndSkipZeroBaselines() {
        #expect(pairedRatios([2, 3, 9], [1, 0, 3]) == [2, 3])
    }

    @Test func interleavingRotatesEveryVariantThroughEveryPosition() {
        let variants = ["a", "b", "c"]
        #expect(interleaved(variants, repeat: 0) == ["a", "b", "c"])
        #expect(interleaved(variants, repeat: 1) == ["b", "c", "a"])
        #expect(interleaved(variants, repeat: 2) == ["c", "a", "b"])
        #expect(interleaved(variants, repeat: 3) == ["a", "b", "c"])
        for position in 0..<3 {
            #expect(Set((0..<3).map { interleaved(variants, repeat: $0)[position] }) == Set(variants))
        }
    }

    @Test func imbalanceIsBusiestOverMean() {
        #expect(imbalance([10, 10, 10, 10]) == 1)
        #expect(imbalance([20, 10, 10, 0]) == 2)
        #expect(imbalance([]) == 0)
    }

    @Test func movedShareCountsChangedKeys() {
        #expect(movedShare([1: 0, 2: 1, 3: 2, 4: 3], [1: 0, 2: 1, 3: 3, 4: 0]) == 0.5)
        #expect(movedShare([1: 0], [:]) == 1)
        #expect(movedShare([Int: Int](), [1: 0]) == 0)
    }

    @Test func numbersAreFormattedWithFixedDigits() {
        #expect(fixed(3.14159, 2) == "3.14")
        #expect(fixed(0.05, 1) == "0.1")
        #expect(fixed(-0.004, 2) == "0.00")
        #expect(fixed(-12.5, 0) == "-13")
        #expect(summaryText(Summary([1, 2, 3]), scale: 1000, digits: 0) == "2000 (1000–3000)")
        #expect(summaryText(nil, digits: 1) == "–")
    }
}

/// The whoami answer both sides of items 3 and 4 are read from (ReuseportTestSupport parses it).
struct WhoamiReplyTests {
    @Test func parsesSlotPidAndPayload() throws {
        let bytes = Array("slot=3 pid=4242 service=bench peer=127.0.0.1:40000\n".utf8) + [1, 2, 0x0a, 3]
        let reply = try #require(WhoamiReply(bytes[...]))
        #expect(reply.slot == 3)
        #expect(reply.pid == 4242)
        #expect(Array(reply.payload) == [1, 2, 0x0a, 3])
        #expect(reply.truncated == 0)
    }

    @Test func parsesTheTruncatedCount() throws {
        let bytes = Array("slot=0 pid=7 service=demo peer=127.0.0.1:40000 truncated=82\nabc".utf8)
        #expect(try #require(WhoamiReply(bytes[...])).truncated == 82)
        #expect(WhoamiReply(Array("slot=0 pid=7 service=demo peer=p truncated=many\nabc".utf8)[...]) == nil)
    }

    @Test func rejectsAnswersWithoutSlotOrNewline() {
        #expect(WhoamiReply(Array("slot=1 pid=2".utf8)[...]) == nil)
        #expect(WhoamiReply(Array("pid=2 service=x\npayload".utf8)[...]) == nil)
    }
}
