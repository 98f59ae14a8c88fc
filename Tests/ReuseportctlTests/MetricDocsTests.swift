import Foundation
import ReuseportTestSupport
import ReuseportTestTraits
import Testing
@testable import reuseportctl

/// The metric tables of the docs and the one registry of metric families in the code
/// (MetricFamily, which MetricsExposition's builder alone emits from): every family emitted is in a
/// table, with its type and labels; every name in a table is emitted; a table is one table (a
/// blank line in it would start a second one, with no header, whose rows no reader takes for metrics).
@Suite(.onTestThreads) struct MetricDocsTests {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    struct Row: Equatable, CustomStringConvertible {
        var name: String
        var kind: String
        var labels: [String]
        var location: String
        var description: String { "\(location): \(name) (\(kind); \(labels.joined(separator: ", ")))" }
    }

    /// The rows of the tables headed `| metric | type | labels | meaning |` in `document`: a cell
    /// may name several families (each in backquotes) that share type and labels. Rows that look
    /// like a metric table's but stand under no such header are returned as `orphans`.
    static func tables(_ text: String, document: String) -> (rows: [Row], orphans: [String]) {
        var rows: [Row] = []
        var orphans: [String] = []
        var inTable = false
        for (number, line) in text.components(separatedBy: "\n").enumerated() {
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).dropFirst().dropLast()
                .map { $0.trimmingCharacters(in: .whitespaces) }
            guard line.hasPrefix("|"), cells.count >= 3 else {
                inTable = false
                continue
            }
            if cells.first == "metric" && cells.dropFirst().first == "type" {
                inTable = true
                continue
            }
            guard cells[0].hasPrefix("`reuseport_") else { continue }
            guard inTable else {
                orphans.append("\(document):\(number + 1): \(cells[0])")
                continue
            }
            let names = cells[0].split(separator: "`").map(String.init).filter { $0.hasPrefix("reuseport_") }
            let labels = cells[2].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            for name in names {
                rows.append(Row(name: name, kind: cells[1], labels: labels, location: "\(document):\(number + 1)"))
            }
        }
        return (rows, orphans)
    }

    @Test func everyEmittedFamilyIsInTheDocsAndNothingElse() throws {
        let text = try String(contentsOfFile: "\(Self.packageRoot)/docs/cli.md", encoding: .utf8)
        let (rows, orphans) = Self.tables(text, document: "docs/cli.md")
        #expect(orphans.isEmpty, "metric rows outside a table with the header | metric | type | labels | meaning |: \(orphans)")
        let documented = Dictionary(grouping: rows, by: \.name)
        for (name, places) in documented where places.count > 1 {
            Issue.record("\(name) is listed more than once: \(places)")
        }
        for family in MetricFamily.allCases {
            guard let row = documented[family.rawValue]?.first else {
                Issue.record("\(family.rawValue) is emitted (MetricFamily) but no table of docs/cli.md names it")
                continue
            }
            #expect(row.kind == family.kind.rawValue, "\(row): the code says \(family.kind)")
            #expect(row.labels == family.labels, "\(row): the code's labels are \(family.labels)")
        }
        let emitted = Set(MetricFamily.allCases.map(\.rawValue))
        for row in rows where !emitted.contains(row.name) {
            Issue.record("\(row) is in the docs but reuseportctl emits no such family")
        }
    }

    /// The checker itself: the rows after a blank line that splits a table are not taken for metrics.
    @Test func aSplitTableIsFound() {
        let document = """
            | metric | type | labels | meaning |
            | --- | --- | --- | --- |
            | `reuseport_slots` | gauge | service | x |

            | `reuseport_no_such_thing_total` | counter | service | y |
            """
        let (rows, orphans) = Self.tables(document, document: "doc.md")
        #expect(rows.map(\.name) == ["reuseport_slots"])
        #expect(orphans == ["doc.md:5: `reuseport_no_such_thing_total`"])
    }
}
