/// Median and spread of repeated measurements.
struct Summary: Equatable {
    var count: Int
    var median: Double
    var min: Double
    var max: Double
    /// The 25th and 75th percentiles (linear interpolation between order statistics).
    var q1: Double
    var q3: Double

    init?(_ values: [Double]) {
        let sorted = values.filter { $0.isFinite }.sorted()
        guard !sorted.isEmpty else { return nil }
        count = sorted.count
        median = Summary.quantile(sorted, 0.5)
        q1 = Summary.quantile(sorted, 0.25)
        q3 = Summary.quantile(sorted, 0.75)
        min = sorted.first!
        max = sorted.last!
    }

    /// The `q` quantile of sorted values, interpolating linearly between neighbours
    /// (type 7 of Hyndman and Fan, what numpy and R use by default).
    static func quantile(_ sorted: [Double], _ q: Double) -> Double {
        precondition(!sorted.isEmpty && (0...1).contains(q))
        let position = q * Double(sorted.count - 1)
        let lower = Int(position.rounded(.down))
        let upper = Swift.min(lower + 1, sorted.count - 1)
        return sorted[lower] + (sorted[upper] - sorted[lower]) * (position - Double(lower))
    }
}

/// The value of each of `values` divided by its partner in `baseline` (same repeat).
func pairedRatios(_ values: [Double], _ baseline: [Double]) -> [Double] {
    zip(values, baseline).compactMap { $1 > 0 ? $0 / $1 : nil }
}

/// The order in which repeat `repeatIndex` runs `variants`: rotated by one each repeat, so
/// every variant runs in every position equally often and drift hits all alike.
func interleaved<T>(_ variants: [T], repeat repeatIndex: Int) -> [T] {
    guard !variants.isEmpty else { return [] }
    let shift = repeatIndex % variants.count
    return Array(variants[shift...] + variants[..<shift])
}

/// Busiest / mean of per-worker counts (1.0 is perfect balance).
func imbalance(_ counts: [UInt64]) -> Double {
    guard !counts.isEmpty else { return 0 }
    let mean = Double(counts.reduce(0, +)) / Double(counts.count)
    return mean > 0 ? Double(counts.max()!) / mean : 0
}

/// Share of keys whose value differs between two maps (over the keys of `before`).
func movedShare<K: Hashable, V: Equatable>(_ before: [K: V], _ after: [K: V]) -> Double {
    guard !before.isEmpty else { return 0 }
    let moved = before.filter { after[$0.key] != $0.value }.count
    return Double(moved) / Double(before.count)
}
