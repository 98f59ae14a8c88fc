#if canImport(Glibc)
import Glibc
#endif
import ReuseportKit
import TOMLKit

/// A configuration that cannot be used: names the file, the key (`service[1].workers`)
/// or the line and column (TOML syntax), and what is wrong.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable, Sendable, Codable {
    public var file: String
    public var key: String?
    public var line: Int?
    public var column: Int?
    public var problem: String

    public var description: String {
        // Syntax errors carry the line and column in `problem`; a key error may carry its line.
        var location = file
        if let key {
            if let line { location += ":\(line)" }
            location += ": \(key)"
        }
        return "\(location): \(problem)"
    }
}

/// TOML text → `DaemonConfiguration`, checking every key (docs/configuration.md).
public enum ConfigurationParser {
    /// Reads and parses `path`.
    /// Reads and parses `path`. Root runs what the file says: the file and every folder above it
    /// must be such that only root can change them, and so must each `exec` program (or its
    /// worker's own user may): `TrustedPath`, as sshd's StrictModes.
    public static func load(path: String) throws(ConfigurationError) -> DaemonConfiguration {
        do throws(UntrustedPathError) {
            // A missing file is left to the read below, which names the errno.
            try TrustedPath.checkFile(path, missing: .allow)
        } catch {
            throw ConfigurationError(file: path, problem: "refused: \(error); root reads only a configuration "
                + "that nobody else can change (chown root, chmod go-w)")
        }
        let text: String
        do {
            text = String(decoding: try Syscall.readFile(path), as: UTF8.self)
        } catch let error as ReuseportError {
            throw ConfigurationError(file: path, problem: "cannot read the file: "
                + String(cString: strerror(error.errno ?? EIO)))
        } catch {
            throw ConfigurationError(file: path, problem: "cannot read the file: \(error)")
        }
        let configuration = try parse(text, file: path)
        for (index, service) in configuration.services.enumerated() {
            try checkProgram(service, key: "service[\(index)].exec[0]", file: path)
            try checkArguments(service, key: "service[\(index)].exec", file: path)
            try checkPreloadBind(service, key: "service[\(index)].preload_bind", file: path)
        }
        return configuration
    }

    /// An `exec` program (found as the worker's execvp(3) would find it) must be one that only
    /// root, the daemon's user or the worker's own user can change. A program that does not
    /// exist is left to fail at its start, unless someone else could create it.
    static func checkProgram(_ service: ServiceConfiguration, key: String, file: String) throws(ConfigurationError) {
        guard let program = programPath(service) else { return }
        var owners = TrustedPath.defaultOwners
        if let user = service.user, let entry = UserIdentity.lookUpUser(user) { owners.insert(entry.uid) }
        do throws(UntrustedPathError) {
            try TrustedPath.checkFile(program, missing: .allowIfOnlyTrustedCanCreate, owners: owners)
        } catch {
            throw ConfigurationError(file: file, key: key,
                                     problem: "program \(program) refused: \(error); root starts only a program that "
                                         + "nobody but root or the worker's user can change")
        }
    }

    /// The `exec` program as the worker's execvp(3) finds it: a name without `/` looked up in the
    /// worker's PATH; nil for a built-in worker or a name found nowhere.
    static func programPath(_ service: ServiceConfiguration) -> String? {
        guard case .exec(let argv) = service.program, let name = argv.first else { return nil }
        guard !name.contains("/") else { return name }
        return WorkerEnvironment.searchPath(service).split(separator: ":").map { "\($0)/\(name)" }
            .first { access($0, X_OK) == 0 }
    }

    /// `preload_bind = true`: the library must be there and trusted (root loads it into every
    /// worker), and the program one the dynamic loader preloads it into (BindPreload.problem).
    static func checkPreloadBind(_ service: ServiceConfiguration, key: String, file: String) throws(ConfigurationError) {
        guard service.preloadBind else { return }
        let library = BindPreload.libraryPath()
        do throws(UntrustedPathError) {
            try TrustedPath.checkFile(library, missing: .refuse)
        } catch {
            throw ConfigurationError(file: file, key: key, problem: "the bind preload library \(library) refused: "
                + "\(error); it is installed with the daemon (\(BindPreload.installedLocation) beside its bin/ folder), "
                + "or named by \(BindPreload.libraryVariable)")
        }
        guard let program = programPath(service) else { return }
        if let problem = BindPreload.problem(program: program) {
            throw ConfigurationError(file: file, key: key, problem: problem)
        }
    }

    /// An `exec` argument that is the absolute path of an existing regular file (the script an
    /// interpreter runs, a file the program loads) is held to the rule of the program itself: a
    /// world-writable `/tmp/x.py` after `/usr/bin/python3` is code anyone could change. Other
    /// arguments (flags, `--opt=/path`, relative names, folders, paths that do not exist) are
    /// not looked at: the daemon cannot tell what the program does with them.
    static func checkArguments(_ service: ServiceConfiguration, key: String, file: String) throws(ConfigurationError) {
        guard case .exec(let argv) = service.program else { return }
        var owners = TrustedPath.defaultOwners
        if let user = service.user, let entry = UserIdentity.lookUpUser(user) { owners.insert(entry.uid) }
        for (index, argument) in argv.enumerated().dropFirst() where argument.hasPrefix("/") {
            var info = stat()
            guard stat(argument, &info) == 0, info.st_mode & S_IFMT == S_IFREG else { continue }
            do throws(UntrustedPathError) {
                try TrustedPath.checkFile(argument, missing: .allow, owners: owners)
            } catch {
                throw ConfigurationError(file: file, key: "\(key)[\(index)]",
                                         problem: "file \(argument) refused: \(error); root starts a worker only with "
                                             + "files named in exec that nobody but root or the worker's user can change")
            }
        }
    }

    /// The least `watchdog_ms` (other than 0, off): docs/configuration.md, "Notifications and
    /// the watchdog". The first `WATCHDOG=1` is due that long after the start, exec and
    /// start-up included, then every half of it; below 100 ms a loaded host's scheduling and
    /// the daemon's own loop take a fair share of the period, and healthy workers get SIGABRT.
    public static let minimumWatchdogMs = 100

    /// Parses configuration text; `file` names it in errors.
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> DaemonConfiguration {
        if let (line, problem) = unparseableLine(text) {
            throw ConfigurationError(file: file, line: line, problem: problem)
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigurationError(file: file, line: error.source.begin.line, column: error.source.begin.column,
                                     problem: "TOML syntax error at line \(error.source.begin.line), column \(error.source.begin.column): \(error.description)")
        } catch {
            throw ConfigurationError(file: file, problem: "TOML syntax error: \(error)")
        }
        let reader = TableReader(table: table, path: nil, file: file)
        try reader.rejectUnknown(["stop_timeout_ms", "service"])
        let stopTimeout = try reader.milliseconds("stop_timeout_ms") ?? DaemonConfiguration.defaultStopTimeoutMs
        guard let serviceTables = table["service"] else {
            throw ConfigurationError(file: file, key: "service",
                                     problem: "no service: add at least one [[service]] table")
        }
        guard let array = serviceTables.array else {
            throw ConfigurationError(file: file, key: "service",
                                     problem: "must be an array of tables ([[service]]), not \(serviceTables.type)")
        }
        guard !array.isEmpty else {
            throw ConfigurationError(file: file, key: "service", problem: "no service: add at least one [[service]] table")
        }
        var services: [ServiceConfiguration] = []
        for (index, element) in array.enumerated() {
            guard let table = element.table else {
                throw ConfigurationError(file: file, key: "service[\(index)]",
                                         problem: "must be a table ([[service]]), not \(element.type)")
            }
            do throws(ConfigurationError) {
                services.append(try parseService(table, path: "service[\(index)]", file: file))
            } catch {
                var located = error
                for table in ["quic", "health_check"] {
                    guard let key = error.key, key.hasPrefix("service[\(index)].\(table)") else { continue }
                    // A key that is missing is named at its table.
                    located.line = line(ofKey: key.dropFirst("service[\(index)].".count), service: index, in: text)
                        ?? line(ofKey: Substring(table), service: index, in: text)
                }
                throw located
            }
        }
        try checkUnique(services, file: file)
        return DaemonConfiguration(stopTimeoutMs: stopTimeout, services: services)
    }

    static let serviceKeys = [
        "name", "listen", "workers", "exec", "builtin", "user", "group", "rcvbuf", "buckets", "seed",
        "restart_backoff_min_ms", "restart_backoff_max_ms", "healthy_after_ms", "ready_after_ms",
        "failover_after_ms", "watchdog_ms", "environment", "flow_tracking", "flow_idle_timeout_ms",
        "max_tracked_flows", "max_new_flows_per_second", "drain_timeout_ms", "quic", "notify", "ready_timeout_ms",
        "drain_signal", "preload_bind", "health_check", "canary_percent", "canary_bake_ms", "canary_gate",
    ]

    /// The signals `drain_signal` may name: those a server commonly takes as "finish what you
    /// serve, take nothing new" (SIGTERM, SIGINT and SIGKILL stop it: that is the stop's job).
    static let drainSignals: [String: Int32] = [
        "SIGHUP": SIGHUP, "SIGQUIT": SIGQUIT, "SIGUSR1": SIGUSR1, "SIGUSR2": SIGUSR2, "SIGWINCH": SIGWINCH,
        "SIGCONT": SIGCONT,
    ]

    static let quicKeys = ["cid_length", "server_id_length", "host_prefix", "config_rotation"]

    /// The line (from 1) where `key` ("quic.cid_length", "quic") of the `service`-th `[[service]]`
    /// is written, found in the text (TOMLKit keeps no positions of values): the key's last name
    /// followed by `=`, or the `[service.quic]` header. Nil if it cannot be told.
    static func line(ofKey key: Substring, service: Int, in text: String) -> Int? {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        let headers = lines.indices.filter { lines[$0].filter { $0 != " " && $0 != "\t" } == "[[service]]" }
        guard service < headers.count else { return nil }
        let end = service + 1 < headers.count ? headers[service + 1] : lines.count
        let name = String(key.split(separator: ".").last ?? key)
        for index in headers[service]..<end {
            let line = lines[index]
            if name == "quic" || name == "health_check", line.filter({ $0 != " " }).hasPrefix("[service.\(name)]") {
                return index + 1
            }
            var rest = line[...]
            while let found = rest.range(of: name) {
                let before = found.lowerBound == line.startIndex ? nil : line[line.index(before: found.lowerBound)]
                let after = line[found.upperBound...].drop { $0 == " " || $0 == "\t" }
                if before.map({ !($0.isLetter || $0.isNumber || $0 == "_" || $0 == ".") }) ?? true, after.hasPrefix("=") {
                    return index + 1
                }
                rest = line[found.upperBound...]
            }
        }
        return nil
    }

    /// `[service.quic]`: the QUIC-LB layout of the service's connection IDs (docs/quic.md).
    static func parseQuic(_ service: TableReader, listen: [Endpoint]) throws(ConfigurationError) -> QuicSteering? {
        guard let value = service.table["quic"] else { return nil }
        guard let table = value.table else {
            throw service.error("quic", "must be a table ([service.quic] or quic = { cid_length = 12 }), not \(value.type)")
        }
        let reader = TableReader(table: table, path: service.key("quic"), file: service.file)
        try reader.rejectUnknown(quicKeys)
        guard listen.contains(where: { $0.transport == .udp }) else {
            throw service.error("quic", "needs a udp:// listener: QUIC steering applies to UDP only")
        }
        guard let cidLength = try reader.integer("cid_length") else {
            throw reader.error("cid_length", "is required: the length of the connection IDs the workers issue "
                + "(\(QuicSteering.cidLengthRange.lowerBound) to \(QuicSteering.cidLengthRange.upperBound))")
        }
        var prefix: [UInt8] = []
        if let text = try reader.string("host_prefix") {
            guard let octets = QuicSteering.octets(hex: text) else {
                throw reader.error("host_prefix", "'\(text)' is not hex octets (for example \"0a\" or \"0a1b\")")
            }
            prefix = octets
        }
        let serverIDLength = try reader.integer("server_id_length")
        let configRotation = try reader.integer("config_rotation") ?? 0
        do throws(QuicSteering.Problem) {
            return try QuicSteering(cidLength: cidLength, serverIDLength: serverIDLength, hostPrefix: prefix,
                                    configRotation: configRotation)
        } catch {
            let key = switch error.setting {
            case .cidLength: "cid_length"
            case .serverIDLength: "server_id_length"
            case .hostPrefix: "host_prefix"
            case .configRotation: "config_rotation"
            }
            throw reader.error(key, error.description)
        }
    }

    static func parseService(_ table: TOMLTable, path: String, file: String) throws(ConfigurationError)
        -> ServiceConfiguration
    {
        let reader = TableReader(table: table, path: path, file: file)
        try reader.rejectUnknown(serviceKeys)
        guard let name = try reader.string("name") else { throw reader.error("name", "is required") }
        guard ServiceName.isValid(name) else {
            throw reader.error("name", "'\(name)' is not a valid service name: use 1 to 64 letters, digits, '-', '_' or '.'"
                + " (it names a folder under the pin directory)")
        }
        guard let listenTexts = try reader.strings("listen") else {
            throw reader.error("listen", "is required: a list like [\"udp://127.0.0.1:5300\"]")
        }
        guard !listenTexts.isEmpty else { throw reader.error("listen", "is empty: give at least one address") }
        var listen: [Endpoint] = []
        for (index, text) in listenTexts.enumerated() {
            do {
                listen.append(try Endpoint(parsing: text))
            } catch {
                throw reader.error("listen[\(index)]", "\(error)")
            }
        }
        guard let workers = try reader.integer("workers") else { throw reader.error("workers", "is required") }
        guard SlotCount.range.contains(workers) else {
            throw reader.error("workers", "must be between 1 and \(SlotCount.range.upperBound), got \(workers)")
        }
        let exec = try reader.strings("exec")
        let builtin = try reader.string("builtin")
        let program: WorkerProgram
        switch (exec, builtin) {
        case (nil, nil):
            throw ConfigurationError(file: file, key: path,
                                     problem: "needs either exec = [\"/path/to/server\", ...] or builtin = \"echo\" | \"whoami\"")
        case (.some, .some):
            throw reader.error("exec", "and builtin are both set: choose one")
        case (.some(let argv), nil):
            guard let first = argv.first, !first.isEmpty else {
                throw reader.error("exec", "is empty: give the program and its arguments")
            }
            program = .exec(argv)
        case (nil, .some(let name)):
            guard let kind = BuiltinWorkerKind(rawValue: name) else {
                throw reader.error("builtin", "unknown built-in worker '\(name)': use \"echo\" or \"whoami\"")
            }
            program = .builtin(kind)
        }
        let user = try reader.identity("user")
        let group = try reader.identity("group")
        if let user, UserIdentity.lookUpUser(user) == nil {
            throw reader.error("user", "no such user '\(user)' on this system")
        }
        if let group, UserIdentity.lookUpGroup(group) == nil {
            throw reader.error("group", "no such group '\(group)' on this system")
        }
        let receiveBuffer = try reader.integer("rcvbuf")
        if let receiveBuffer, !(1...Int(Int32.max)).contains(receiveBuffer) {
            throw reader.error("rcvbuf", "must be between 1 and \(Int32.max) bytes, got \(receiveBuffer)")
        }
        let buckets = try reader.integer("buckets") ?? Int(RP_DEFAULT_BUCKETS)
        guard BucketCount.range.contains(buckets) else {
            throw reader.error("buckets", "must be between 1 and \(BucketCount.range.upperBound), got \(buckets)")
        }
        guard buckets >= workers else {
            throw reader.error("buckets", "\(buckets) buckets cannot spread over \(workers) workers: need at least one each")
        }
        let seed = try reader.integer("seed") ?? 0
        guard (0...Int(UInt32.max)).contains(seed) else {
            throw reader.error("seed", "must be between 0 and \(UInt32.max), got \(seed)")
        }
        var restart = RestartPolicy()
        restart.backoffMinimumMs = try reader.milliseconds("restart_backoff_min_ms") ?? restart.backoffMinimumMs
        restart.backoffMaximumMs = try reader.milliseconds("restart_backoff_max_ms") ?? restart.backoffMaximumMs
        restart.healthyAfterMs = try reader.milliseconds("healthy_after_ms") ?? restart.healthyAfterMs
        restart.readyAfterMs = try reader.milliseconds("ready_after_ms") ?? restart.readyAfterMs
        guard restart.backoffMinimumMs > 0 else { throw reader.error("restart_backoff_min_ms", "must be at least 1") }
        guard restart.backoffMaximumMs >= restart.backoffMinimumMs else {
            throw reader.error("restart_backoff_max_ms",
                               "(\(restart.backoffMaximumMs)) is below restart_backoff_min_ms (\(restart.backoffMinimumMs))")
        }
        let failover = try reader.milliseconds("failover_after_ms") ?? ServiceConfiguration.defaultFailoverAfterMs
        let environment = try reader.strings("environment") ?? []
        var names: [String: Int] = [:]
        for (index, entry) in environment.enumerated() {
            if let problem = WorkerEnvironment.problem(entry) { throw reader.error("environment[\(index)]", problem) }
            let name = WorkerEnvironment.split(entry).name
            if let first = names[name] {
                throw reader.error("environment[\(index)]", "\(name) is already set by environment[\(first)]")
            }
            names[name] = index
        }
        var service = ServiceConfiguration(name: name, listen: listen, workers: workers, program: program, user: user,
                                           group: group, receiveBuffer: receiveBuffer, bucketCount: buckets,
                                           seed: UInt32(seed), restart: restart, failoverAfterMs: failover,
                                           environment: environment)
        service.watchdogMs = try reader.milliseconds("watchdog_ms") ?? 0
        guard service.watchdogMs == 0 || service.watchdogMs >= minimumWatchdogMs else {
            throw reader.error("watchdog_ms", "must be 0 (off) or at least \(minimumWatchdogMs) milliseconds, got "
                + "\(service.watchdogMs): the worker sends its first WATCHDOG=1 within it of its start, then every half")
        }
        service.notify = try reader.boolean("notify") ?? false
        service.readyTimeoutMs = try reader.milliseconds("ready_timeout_ms") ?? service.readyTimeoutMs
        guard service.readyTimeoutMs > 0 else { throw reader.error("ready_timeout_ms", "must be at least 1") }
        if let name = try reader.string("drain_signal"), name != "none" {
            guard let number = drainSignals[name] else {
                throw reader.error("drain_signal", "'\(name)' is not a signal a worker may get to start draining: use "
                    + "\"none\" or one of " + drainSignals.keys.sorted().joined(separator: ", "))
            }
            service.drainSignal = number
        }
        service.tracking = try parseTracking(reader)
        service.quic = try parseQuic(reader, listen: listen)
        service.preloadBind = try reader.boolean("preload_bind") ?? false
        if service.preloadBind, case .builtin = program {
            throw reader.error("preload_bind", "applies to an exec program that binds its own sockets; a built-in "
                + "worker serves the sockets it is given")
        }
        service.healthCheck = try parseHealthCheck(reader, listen: listen)
        service.canary = try parseCanary(reader)
        return service
    }

    /// The flow-tracking keys of a service (docs/configuration.md, "Placement changes").
    static func parseTracking(_ reader: TableReader) throws(ConfigurationError) -> ServiceDataPlane.FlowTracking {
        var tracking = ServiceDataPlane.FlowTracking()
        tracking.enabled = try reader.boolean("flow_tracking") ?? tracking.enabled
        tracking.idleTimeoutMs = try reader.milliseconds("flow_idle_timeout_ms") ?? tracking.idleTimeoutMs
        guard tracking.idleTimeoutMs >= 100 else {
            throw reader.error("flow_idle_timeout_ms", "must be at least 100 milliseconds, got \(tracking.idleTimeoutMs)")
        }
        // Absent: sized from the workers when the service is built (TrackedFlowCount.sized).
        if let maxFlows = try reader.integer("max_tracked_flows") {
            guard TrackedFlowCount.range.contains(maxFlows) else {
                throw reader.error("max_tracked_flows",
                                   "must be between 1 and \(TrackedFlowCount.range.upperBound), got \(maxFlows)")
            }
            tracking.maxFlows = maxFlows
        }
        if let rate = try reader.integer("max_new_flows_per_second") {
            guard (0...1_000_000_000).contains(rate) else {
                throw reader.error("max_new_flows_per_second", "must be between 0 (no bound) and 1000000000, got \(rate)")
            }
            tracking.recordsPerSecond = rate
        }
        tracking.drainTimeoutMs = try reader.milliseconds("drain_timeout_ms") ?? tracking.drainTimeoutMs
        return tracking
    }

    /// Service names and listen addresses are unique across the file. Two listeners
    /// overlap when they share transport and port and one address is the other's or a
    /// wildcard: the kernel would then split that port's traffic between two services.
    static func checkUnique(_ services: [ServiceConfiguration], file: String) throws(ConfigurationError) {
        var names: [String: Int] = [:]
        var seen: [(endpoint: Endpoint, key: String)] = []
        for (index, service) in services.enumerated() {
            if let first = names[service.name] {
                throw ConfigurationError(file: file, key: "service[\(index)].name",
                                         problem: "'\(service.name)' is already the name of service[\(first)]")
            }
            names[service.name] = index
            for (position, endpoint) in service.listen.enumerated() where endpoint.address.port != 0 {
                let key = "service[\(index)].listen[\(position)]"
                if let clash = seen.first(where: { overlaps($0.endpoint, endpoint) }) {
                    throw ConfigurationError(file: file, key: key,
                                             problem: "\(endpoint) overlaps \(clash.endpoint) of \(clash.key): "
                                                 + "each address and port may belong to one listener only")
                }
                seen.append((endpoint, key))
            }
        }
    }

    static func overlaps(_ a: Endpoint, _ b: Endpoint) -> Bool {
        guard a.transport == b.transport, a.address.port == b.address.port else { return false }
        let x = a.address.address, y = b.address.address
        if x == y { return true }
        // A wildcard of one family covers that family's addresses ([::] also IPv4 unless v6only,
        // which the daemon sets, so it covers IPv6 only).
        return x.isV4 == y.isV4 && (x.isWildcard || y.isWildcard)
    }

    /// The most dots on one line outside strings and comments. toml++ limits how deep arrays
    /// and inline tables nest, but not dotted keys (`a.b.c = 1`, `[a.b.c]`): it recurses once a
    /// level, and some 30 000 levels overflow an 8 MiB stack (Tests/fuzz/regressions/config).
    /// A configuration needs none; a line of floats would count too, but none is valid here.
    static let maximumKeyDots = 64

    /// What toml++ 3.4 (in TOMLKit 0.6) would not survive, found before it parses: the line and
    /// why. Besides deep keys, toml++ asserts what it has not checked, which aborts a debug
    /// build and is undefined behaviour under NDEBUG: that a table header's name starts with a
    /// letter, digit, `-`, `_` or a quote (`parser::parse_key`; `[\`, `[[` at the end of a line),
    /// that a value follows `[` or `,` in an array (`parser::parse_value`; `[1, }`), and that the
    /// digits of dates and times are there (`parser::parse_time`; `1979-05-27T;`): no key takes
    /// a date or a time, so a bare value with ':', or '-' or '+' past its sign, is refused. Follows
    /// TOML's strings ("basic" with escapes, 'literal', their multi-line forms), comments, and
    /// values (a `[` after `=` or inside an array opens no header).
    static func unparseableLine(_ text: String) -> (line: Int, problem: String)? {
        enum Inside { case code, comment, basic, literal, multiLineBasic, multiLineLiteral }
        let quote = UInt8(ascii: "\""), apostrophe = UInt8(ascii: "'"), backslash = UInt8(ascii: "\\")
        let bytes = Array(text.utf8)
        var inside = Inside.code
        var line = 1, dots = 0, index = 0
        /// Whether this line has had its '=' (what follows is a value); the arrays and inline
        /// tables open in values, innermost last; whether the innermost array awaits a value.
        var valueStarted = false, open: [UInt8] = [], arrayAwaitsValue = false
        /// Whether a key comes next (at the start of a line, in an inline table), not a value.
        var keyExpected = true
        /// How many of `byte` start at `index`.
        func run(of byte: UInt8) -> Int {
            var end = index
            while end < bytes.count && bytes[end] == byte { end += 1 }
            return end - index
        }
        func tooManyDots(_ line: Int) -> (line: Int, problem: String) {
            (line, "line \(line) has more than \(maximumKeyDots) dots outside strings: keys "
                + "nested that deep (a.b.c...) would overflow the TOML parser's stack")
        }
        func startsAName(_ byte: UInt8) -> Bool {
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a)
                || byte == 0x2d || byte == 0x5f || byte == quote || byte == apostrophe || byte == UInt8(ascii: "]")
        }
        while index < bytes.count {
            let byte = bytes[index]
            if byte == 0x0a {
                line += 1
                dots = 0
                if open.isEmpty {
                    valueStarted = false
                    keyExpected = true
                }
                // A newline ends a comment, and a one-line string (TOML refuses the rest).
                if inside != .multiLineBasic && inside != .multiLineLiteral { inside = .code }
                index += 1
                continue
            }
            switch inside {
            case .code:
                // Blanks and comments leave an array awaiting its value.
                if byte == 0x20 || byte == 0x09 || byte == 0x0d {
                    index += 1
                    continue
                }
                if byte == UInt8(ascii: "}") && arrayAwaitsValue {
                    return (line, "line \(line): '}' where an array needs a value or ']'")
                }
                if byte != UInt8(ascii: "#") {
                    arrayAwaitsValue = byte == UInt8(ascii: ",") && open.last == UInt8(ascii: "[")
                }
                if byte == UInt8(ascii: "[") && !valueStarted && open.isEmpty {
                    var name = index + 1
                    if name < bytes.count && bytes[name] == UInt8(ascii: "[") { name += 1 }
                    while name < bytes.count && (bytes[name] == 0x20 || bytes[name] == 0x09) { name += 1 }
                    guard name < bytes.count, startsAName(bytes[name]) else {
                        return (line, "line \(line): a table header needs a name after '[' or '[[' (letters, digits, "
                            + "'-', '_' or a quoted name)")
                    }
                    index = name
                    continue
                }
                if !keyExpected && !Array("[]{},#=\"'".utf8).contains(byte) {
                    // A bare value (integer, boolean, float, date, time) up to what ends a value.
                    var end = index
                    while end < bytes.count && !Array(" \t\r\n[]{},#=\"'".utf8).contains(bytes[end]) { end += 1 }
                    let token = bytes[index..<end]
                    if token.contains(UInt8(ascii: ":"))
                        || token.dropFirst().contains(where: { $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "+") })
                    {
                        return (line, "line \(line): '\(String(decoding: token.prefix(40), as: UTF8.self))' is no value "
                            + "a configuration takes (no key takes a date or a time)")
                    }
                    dots += token.count { $0 == UInt8(ascii: ".") }
                    if dots > maximumKeyDots { return tooManyDots(line) }
                    index = end
                    continue
                }
                if byte == UInt8(ascii: "=") {
                    valueStarted = true
                    keyExpected = false
                } else if byte == UInt8(ascii: "[") || (byte == UInt8(ascii: "{") && valueStarted) {
                    open.append(byte)
                    arrayAwaitsValue = byte == UInt8(ascii: "[")
                    keyExpected = byte == UInt8(ascii: "{")
                } else if byte == UInt8(ascii: ",") {
                    keyExpected = open.last == UInt8(ascii: "{")
                } else if byte == UInt8(ascii: "]") || byte == UInt8(ascii: "}") {
                    if !open.isEmpty { open.removeLast() }
                } else if byte == UInt8(ascii: ".") {
                    dots += 1
                    if dots > maximumKeyDots { return tooManyDots(line) }
                } else if byte == UInt8(ascii: "#") {
                    inside = .comment
                } else if byte == quote || byte == apostrophe {
                    let count = run(of: byte)
                    if count >= 3 {
                        inside = byte == quote ? .multiLineBasic : .multiLineLiteral
                        index += 3
                        continue
                    }
                    // "" is an empty string; " opens one.
                    if count == 1 { inside = byte == quote ? .basic : .literal }
                    index += count
                    continue
                }
            case .comment:
                break
            case .basic, .multiLineBasic:
                if byte == backslash {
                    // An escape is two bytes; a line-ending backslash leaves its newline to be counted.
                    index += index + 1 < bytes.count && bytes[index + 1] == 0x0a ? 1 : 2
                    continue
                }
                if byte == quote {
                    let count = run(of: quote)
                    // A multi-line string ends at three quotes; up to two more before them are its own.
                    if inside == .basic || count >= 3 { inside = .code }
                    index += inside == .code && count >= 3 ? count : 1
                    continue
                }
            case .literal, .multiLineLiteral:
                if byte == apostrophe {
                    let count = run(of: apostrophe)
                    if inside == .literal || count >= 3 { inside = .code }
                    index += inside == .code && count >= 3 ? count : 1
                    continue
                }
            }
            index += 1
        }
        return nil
    }
}

/// Service names become folder names on bpffs and log labels.
enum ServiceName {
    static func isValid(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), name != ".", name != ".." else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a)
                || byte == 0x2d || byte == 0x5f || byte == 0x2e
        }
    }
}

/// Typed reads of one TOML table, each error naming `path.key`.
struct TableReader {
    let table: TOMLTable
    let path: String?
    let file: String

    func key(_ name: String) -> String { path.map { "\($0).\(name)" } ?? name }

    func error(_ name: String, _ problem: String) -> ConfigurationError {
        ConfigurationError(file: file, key: key(name), problem: problem)
    }

    func rejectUnknown(_ known: [String]) throws(ConfigurationError) {
        for name in table.keys.sorted() where !known.contains(name) {
            throw error(name, "unknown key (known keys here: \(known.joined(separator: ", ")))")
        }
    }

    func string(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = table[name] else { return nil }
        guard let text = value.string else { throw error(name, "must be a string, not \(value.type)") }
        return text
    }

    func integer(_ name: String) throws(ConfigurationError) -> Int? {
        guard let value = table[name] else { return nil }
        guard let number = value.int else { throw error(name, "must be an integer, not \(value.type)") }
        return number
    }

    /// A duration in milliseconds: 0 up to one day.
    func milliseconds(_ name: String) throws(ConfigurationError) -> Int? {
        guard let value = try integer(name) else { return nil }
        guard (0...86_400_000).contains(value) else {
            throw error(name, "must be between 0 and 86400000 milliseconds, got \(value)")
        }
        return value
    }

    func boolean(_ name: String) throws(ConfigurationError) -> Bool? {
        guard let value = table[name] else { return nil }
        guard let flag = value.bool else { throw error(name, "must be true or false, not \(value.type)") }
        return flag
    }

    func strings(_ name: String) throws(ConfigurationError) -> [String]? {
        guard let value = table[name] else { return nil }
        guard let array = value.array else { throw error(name, "must be an array of strings, not \(value.type)") }
        var result: [String] = []
        for (index, element) in array.enumerated() {
            guard let text = element.string else {
                throw error("\(name)[\(index)]", "must be a string, not \(element.type)")
            }
            result.append(text)
        }
        return result
    }

    /// A user or group: a name, or a numeric id (as an integer or a string of digits).
    func identity(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = table[name] else { return nil }
        if let number = value.int {
            guard number >= 0 && number < Int(UInt32.max) else { throw error(name, "\(number) is not a valid id") }
            return String(number)
        }
        guard let text = value.string, !text.isEmpty else {
            throw error(name, "must be a name or a numeric id, not \(value.type)")
        }
        return text
    }
}
