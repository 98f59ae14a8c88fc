/// How the human views write numbers.
enum HumanFormat {
    /// 1536 → "1.5 KiB"; below 1 KiB exact bytes.
    static func bytes(_ value: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var value = value
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(Int(value)) B" : "\(fixed(value, digits: 1)) \(units[unit])"
    }

    static func bytes(_ value: UInt64) -> String { bytes(Double(value)) }

    /// 45 → "45s", 3725 → "1h02m", 200000 → "2d07h".
    static func duration(_ seconds: Double?) -> String {
        guard let seconds else { return "-" }
        let whole = Int(seconds)
        let (days, hours, minutes, secs) = (whole / 86400, whole / 3600 % 24, whole / 60 % 60, whole % 60)
        if days > 0 { return "\(days)d\(twoDigits(hours))h" }
        if hours > 0 { return "\(hours)h\(twoDigits(minutes))m" }
        if minutes > 0 { return "\(minutes)m\(twoDigits(secs))s" }
        return "\(secs)s"
    }

    static func twoDigits(_ value: Int) -> String { value < 10 ? "0\(value)" : "\(value)" }

    /// A rate per second: "1234/s", "12.5k/s".
    static func rate(_ perSecond: Double) -> String {
        if perSecond < 10_000 { return "\(fixed(perSecond, digits: perSecond < 100 ? 1 : 0))/s" }
        if perSecond < 10_000_000 { return "\(fixed(perSecond / 1000, digits: 1))k/s" }
        return "\(fixed(perSecond / 1_000_000, digits: 1))M/s"
    }

    static func percent(_ part: UInt64, of total: UInt64) -> String {
        total == 0 ? "-" : "\(fixed(Double(part) * 100 / Double(total), digits: 1))%"
    }

    static func hex32(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
    }

    static func optional<T>(_ value: T?) -> String { value.map { "\($0)" } ?? "-" }

    /// `value` with exactly `digits` decimals (no Foundation formatting: locale-independent).
    static func fixed(_ value: Double, digits: Int) -> String {
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let scaled = (value * scale).rounded()
        let whole = Int(scaled / scale)
        guard digits > 0 else { return "\(whole)" }
        let fraction = Int(scaled) - whole * Int(scale)
        let text = String(fraction)
        return "\(whole).\(String(repeating: "0", count: digits - text.count))\(text)"
    }
}
