import ReuseportDaemon
import Testing

/// The `environment` key, in process.
struct EnvironmentKeyTests {
    func parse(_ line: String) throws -> ServiceConfiguration {
        try ConfigurationParser.parse("""
            [[service]]
            name = "e"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            builtin = "echo"
            \(line)
            """, file: "e.toml").services[0]
    }

    @Test func entriesAreKept() throws {
        #expect(try parse("environment = [\"A=1\", \"B_2=x=y\", \"EMPTY=\"]").environment == ["A=1", "B_2=x=y", "EMPTY="])
        #expect(try parse("").environment == [])
    }

    @Test(arguments: [
        ("environment = [\"NOEQUALS\"]", "service[0].environment[0]: 'NOEQUALS' is not of the form KEY=value"),
        ("environment = [\"1A=x\"]", "service[0].environment[0]: '1A' is not a valid variable name"),
        ("environment = [\"A-B=x\"]", "service[0].environment[0]: 'A-B' is not a valid variable name"),
        ("environment = [\"LISTEN_FDS=9\"]", "service[0].environment[0]: LISTEN_FDS is set by the daemon"),
        ("environment = [\"REUSEPORT_SLOT=9\"]", "service[0].environment[0]: REUSEPORT_SLOT is set by the daemon"),
        ("environment = [\"A=1\", \"A=2\"]", "service[0].environment[1]: A is already set by environment[0]"),
        ("environment = \"A=1\"", "service[0].environment: must be an array of strings"),
    ])
    func mistakesAreNamed(line: String, expected: String) {
        #expect {
            _ = try parse(line)
        } throws: { error in
            "\(error)".contains(expected)
        }
    }
}
