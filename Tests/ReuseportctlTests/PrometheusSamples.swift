import ReuseportTestSupport

/// The samples of a text exposition, by series ("name{labels}" exactly as written), with their
/// values. Throws on a line that is neither a comment nor `SERIES VALUE`.
struct PrometheusSamples {
    private(set) var values: [String: Double] = [:]

    init(_ text: String) throws {
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            let parts = line.split(separator: " ")
            guard parts.count == 2, let value = Double(parts[1]) else {
                throw HarnessError("not a sample line: \(line)")
            }
            values[String(parts[0])] = value
        }
    }

    subscript(series: String) -> Double? { values[series] }
}
