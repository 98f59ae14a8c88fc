@testable import ReuseportDaemon
import ReuseportKit
import Testing

/// `[service.quic]` and what a worker of such a service is told, in process (no root needed).
struct QuicConfigurationTests {
    func parse(_ lines: String, listen: String = "udp://127.0.0.1:0") throws -> ServiceConfiguration {
        try ConfigurationParser.parse("""
            [[service]]
            name = "q"
            listen = ["\(listen)"]
            workers = 4
            builtin = "echo"
            \(lines)
            """, file: "q.toml").services[0]
    }

    @Test func everyKeyIsRead() throws {
        let service = try parse("""
            [service.quic]
            cid_length = 16
            server_id_length = 4
            host_prefix = "0a1b"
            config_rotation = 5
            """)
        #expect(service.quic == (try QuicSteering(cidLength: 16, serverIDLength: 4, hostPrefix: [0x0a, 0x1b],
                                                  configRotation: 5)))
        #expect(try parse("quic = { cid_length = 8 }").quic?.serverIDLength == 2, "the least: a 2-octet worker ID")
        #expect(try parse("").quic == nil)
    }

    @Test(arguments: [
        ("quic = 12", "service[0].quic: must be a table"),
        ("quic = { }", "service[0].quic.cid_length: is required"),
        ("quic = { cid_length = 7 }", "service[0].quic.cid_length: must be between 8 and 20 octets"),
        ("quic = { cid_length = 21 }", "service[0].quic.cid_length: must be between 8 and 20 octets"),
        ("quic = { cid_length = 8, server_id_length = 4 }",
         "service[0].quic.server_id_length: 4 leaves 3 of the 8 octets for the server's own bytes"),
        ("quic = { cid_length = 12, server_id_length = 5 }", "service[0].quic.server_id_length: must leave 2 to 4"),
        ("quic = { cid_length = 12, host_prefix = \"xyz\" }", "service[0].quic.host_prefix: 'xyz' is not hex"),
        ("quic = { cid_length = 16, host_prefix = \"01020304\" }", "service[0].quic.host_prefix: is 4 octets"),
        ("quic = { cid_length = 12, config_rotation = 7 }", "service[0].quic.config_rotation: must be between 0 and 6"),
        ("quic = { cid_length = 12, nonce = 1 }", "service[0].quic.nonce: unknown key"),
    ])
    func mistakesAreNamed(line: String, expected: String) {
        let error = #expect(throws: ConfigurationError.self) { try parse(line) }
        // The key's line: the 6th of the file.
        #expect(error?.description.hasPrefix("q.toml:6: \(expected)") == true, "\(error.map { "\($0)" } ?? "")")
    }

    /// The error names the line of the offending key, in the right service.
    @Test func theLineOfTheKeyIsNamed() {
        let text = """
            [[service]]
            name = "a"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            builtin = "echo"
            quic = { cid_length = 12 }

            [[service]]
            name = "b"
            listen = ["udp://127.0.0.1:0"]
            workers = 1
            builtin = "echo"

            [service.quic]
            cid_length = 12
            config_rotation = 9
            """
        let error = #expect(throws: ConfigurationError.self) { try ConfigurationParser.parse(text, file: "two.toml") }
        #expect(error?.line == 16)
        #expect(error?.description.hasPrefix("two.toml:16: service[1].quic.config_rotation: must be between 0 and 6")
                == true, "\(error.map { "\($0)" } ?? "")")
    }

    @Test func aTCPOnlyServiceHasNoQuic() {
        let error = #expect(throws: ConfigurationError.self) {
            try parse("quic = { cid_length = 12 }", listen: "tcp://127.0.0.1:0")
        }
        #expect(error?.key == "service[0].quic")
    }

    /// Each worker learns its own server ID; the names are the daemon's alone.
    @Test func workersLearnTheirServerID() throws {
        let service = try parse("quic = { cid_length = 12, server_id_length = 3, host_prefix = \"2a\", config_rotation = 1 }")
        let environment = WorkerEnvironment.make(service, listeners: 1, slot: 3)
        #expect(environment.contains("REUSEPORT_QUIC_SERVER_ID=2a0003"))
        #expect(environment.contains("REUSEPORT_QUIC_CID_LENGTH=12"))
        #expect(environment.contains("REUSEPORT_QUIC_CONFIG_ROTATION=1"))
        #expect(!WorkerEnvironment.make(try parse(""), listeners: 1, slot: 3).contains { $0.hasPrefix("REUSEPORT_QUIC") })
        #expect(WorkerEnvironment.problem("REUSEPORT_QUIC_SERVER_ID=00") != nil)
    }
}
