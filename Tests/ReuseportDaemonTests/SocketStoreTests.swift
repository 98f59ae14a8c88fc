#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ReuseportControl
@testable import ReuseportDaemon
import ReuseportKit
import ReuseportTestSupport
import ReuseportTestTraits
import Testing

/// The names and messages of systemd's fd store (SocketStore.swift), without a daemon.
struct StoredSocketNameTests {
    @Test("a slot's socket is named svc.<service>.l<listener>.s<slot>.g<generation>, and read back from its end")
    func nameScheme() throws {
        let name = StoredSocketName(service: "demo", listener: 0, slot: 3)
        #expect(name.description == "svc.demo.l0.s3.g0")
        #expect(StoredSocketName("svc.demo.l0.s3.g0") == name)
        // A service name may hold dots, even ones that look like the fields after it.
        let dotted = try #require(StoredSocketName("svc.a.l9.s1.l1.s2.g0"))
        #expect(dotted == StoredSocketName(service: "a.l9.s1", listener: 1, slot: 2))
        for other in ["svc.demo.l0.s03.g0", "svc.demo.l0.s+3.g0", "svc.demo.l0.s3", "svc..l0.s3.g0", "stored",
                      "svc.demo.l0.s3.g", "svc.demo.x0.s3.g0", "svc.de/mo.l0.s3.g0", "svc.demo.l0.s99999999999.g0"] {
            #expect(StoredSocketName(other) == nil, "\(other)")
        }
    }

    @Test("every valid service name makes a name systemd accepts: at most 255 characters, no ':' or control character")
    func namesFitSystemdsRule() {
        let longest = String(repeating: "x.-_", count: 16)
        #expect(ServiceName.isValid(longest))
        let name = StoredSocketName(service: longest, listener: Int(Int32.max), slot: UInt32.max,
                                    generation: UInt32.max).description
        #expect(StoredSocketName.isValidFDName(name), "\(name.utf8.count) characters")
        #expect(StoredSocketName(name)?.service == longest)
        // systemd's fdname_is_valid(): ':' separates LISTEN_FDNAMES; control characters and
        // non-ASCII are refused; 255 characters at most.
        #expect(!StoredSocketName.isValidFDName("svc.a:b.l0.s0.g0"))
        #expect(!StoredSocketName.isValidFDName("svc.a\nb.l0.s0.g0"))
        #expect(!StoredSocketName.isValidFDName("svc.é.l0.s0.g0"))
        #expect(StoredSocketName.isValidFDName(String(repeating: "a", count: 255)))
        #expect(!StoredSocketName.isValidFDName(String(repeating: "a", count: 256)))
    }

    @Test("FDSTORE=1 and FDSTOREREMOVE=1 messages, each with its FDNAME=")
    func messages() {
        #expect(NotifyClient.storeMessage(name: "svc.demo.l0.s3.g0") == "FDSTORE=1\nFDNAME=svc.demo.l0.s3.g0")
        #expect(NotifyClient.removeMessage(name: "svc.demo.l0.s3.g0") == "FDSTOREREMOVE=1\nFDNAME=svc.demo.l0.s3.g0")
    }
}

/// The fd store with a real daemon: a datagram socket stands in for systemd's notify socket and
/// keeps what the daemon stores; a second daemon gets those descriptors as systemd passes them
/// after a restart (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID).
@Suite(.onTestThreads, .serialized, .enabled(if: isRoot, "the daemon loads BPF programs and pins maps: needs root"))
struct SocketStoreTests {
    typealias Receiver = ServiceManagerTests.NotifyReceiver

    static func cookies(_ daemon: TestDaemon, service: String, slots: Int) throws -> [UInt64?] {
        let array = try SocketArray(pinned: PinLayout(root: daemon.pinRoot, service: service), listener: 0)
        return try (0..<UInt32(slots)).map { try array.cookie(at: $0) }
    }

    static func cookie(_ descriptor: OwnedDescriptor) throws -> UInt64 {
        try Syscall.getOption(descriptor.fd.rawValue, SOL_SOCKET, SO_COOKIE, UInt64.self, "SO_COOKIE")
    }

    /// `withArrays`: the next daemon also gets the listeners' socket arrays the first one stored,
    /// and its program takes over in one step: every datagram sent while it starts reaches its
    /// slot. Without them (the fallback), the old program is detached first, and what arrives in
    /// those milliseconds is still answered, though maybe from another slot.
    @Test("every slot's socket goes to the store; a daemon started with them reuses each at its slot: no flow moves, nothing queued is lost",
          arguments: [true, false])
    func restartKeepsSockets(withArrays: Bool) throws {
        let workers = 4
        let config = serviceTable("fd", workers: workers, extra: "ready_after_ms = 200")
        let receiver = try Receiver(abstract: true)
        let first = try TestDaemon(config: config,
                                   environment: ["NOTIFY_SOCKET": receiver.address, "FDSTORE": "16"])
        try #require(try receiver.waitFor { ServiceManagerTests.has($0, "READY=1") } != nil,
                     "no READY=1; log: \(first.logTail(10))")

        // One FDSTORE=1 per slot, named for it, with the very socket rp_sockets holds; and the
        // listener's socket array.
        let arrays = receiver.passing("FDSTORE=1").filter { $0.text.contains("FDNAME=arr.") }
        #expect(arrays.map(\.text) == ["FDSTORE=1\nFDNAME=arr.fd.l0\nFDPOLL=0"] && arrays.allSatisfy { $0.descriptors.count == 1 })
        let stored = receiver.passing("FDSTORE=1").filter { $0.text.contains("FDNAME=svc.") }
        let names = stored.compactMap { message in
            message.text.split(separator: "\n").first { $0.hasPrefix("FDNAME=") }.map { String($0.dropFirst(7)) }
        }
        #expect(names == (0..<workers).map { "svc.fd.l0.s\($0).g1" }, "\(receiver.messages.map(\.text))")
        #expect(stored.allSatisfy { $0.descriptors.count == 1 })
        let pinned = try Self.cookies(first, service: "fd", slots: workers)
        let passed = try stored.map { try Self.cookie($0.descriptors[0]) }
        #expect(passed.map(Optional.some) == pinned, "passed \(passed), pinned \(pinned)")

        let services = try first.status()
        let destination = try Endpoint(parsing: try #require(services.first?.listeners.first)).address
        let clients = try (0..<64).map { _ in try FlowClient(.udp, local: SocketAddress(.loopbackV4, 0)) }
        let before = try Whoami.ask(clients, to: destination)
        try #require(before.allSatisfy { $0 != nil }, "unanswered before the restart")

        // A stop as `systemctl restart` does it: SIGTERM. The daemon stops its workers, closes
        // its sockets, removes its pins, and drops nothing from the store.
        #expect(first.stop() == 0)
        try receiver.waitFor(timeoutMs: 200) { _ in false }
        #expect(receiver.with("FDSTOREREMOVE=1").isEmpty, "\(receiver.with("FDSTOREREMOVE=1"))")

        // No daemon runs: the stored sockets hold what arrives, still steered to their slots.
        for (index, client) in clients.enumerated().prefix(16) {
            try client.send(Array("while down \(index)".utf8), to: destination)
        }

        // The next daemon, with the store's descriptors (and one of a service that is gone).
        let gone = try ReuseportSocket(endpoint: try Endpoint(parsing: "udp://127.0.0.1:0"))
        let listening = zip(stored, names).map { (descriptor: $0.descriptors[0].fd.rawValue, name: $1) }
            + [(descriptor: gone.fd.rawValue, name: "svc.gone.l0.s0.g0")]
            + (withArrays ? arrays.map { (descriptor: $0.descriptors[0].fd.rawValue, name: "arr.fd.l0") } : [])
        // Without: the stored array must not outlive the old program (as systemd would not keep it).
        if !withArrays { for array in arrays { for descriptor in array.descriptors { descriptor.close() } } }
        let next = try Receiver(abstract: true)
        let second = try TestDaemon(config: config, environment: ["NOTIFY_SOCKET": next.address, "FDSTORE": "16"],
                                    listening: listening)
        // While it starts (and takes over the groups from the previous program), a datagram every
        // millisecond or so: none may be dropped.
        var sentDuringStart = 0
        var ready: String?
        while ready == nil, sentDuringStart < 30_000 {
            try clients[16 + sentDuringStart % 48].send(Array("during start \(sentDuringStart)".utf8), to: destination)
            sentDuringStart += 1
            ready = try next.waitFor(timeoutMs: 1) { ServiceManagerTests.has($0, "READY=1") }
        }
        try #require(ready != nil, "no READY=1; log: \(second.logTail(10))")
        #expect(try Self.cookies(second, service: "fd", slots: workers) == pinned, "log: \(second.logTail(10))")
        #expect(try second.status().first?.listeners == services.first?.listeners)
        // No socket was bound beside the reused ones (sock_diag lists each socket once).
        let bound = try SocketDiagnostics.sockets([.udp]).values.filter { $0.local == destination }.map(\.cookie)
        #expect(Set(bound) == Set(pinned.compactMap { $0 }) && bound.count == workers, "\(bound) for \(pinned)")
        // Reused sockets are in the store already: not sent again. The stranger is dropped from it.
        #expect(next.passing("FDSTORE=1").filter { $0.text.contains("FDNAME=svc.") }.isEmpty)
        // The array goes to the store again only when the previous one was not taken over.
        #expect(next.passing("FDSTORE=1").filter { $0.text.contains("FDNAME=arr.") }.count == (withArrays ? 0 : 1))
        #expect(next.with("FDSTOREREMOVE=1") == ["FDSTOREREMOVE=1\nFDNAME=svc.gone.l0.s0.g0"])
        #expect(second.log.contains("refusing stored descriptor svc.gone.l0.s0.g0"))
        #expect(second.log.contains("4 sockets reused, 1 refused"), "\(second.logTail(10))")

        // What arrived while no daemon ran is answered by the new workers, from the same slots, and
        // so is what arrived while the daemon started.
        var late: [Int: WhoamiReply] = [:]
        var answeredDuringStart = 0
        var elsewhereDuringStart = 0
        let deadline = nowMs() + 5000
        while late.count < 16 || answeredDuringStart < sentDuringStart, nowMs() < deadline {
            for (index, client) in clients.enumerated() {
                while let bytes = try client.receive(timeoutMs: 0), let reply = WhoamiReply(bytes) {
                    if String(decoding: reply.payload, as: UTF8.self).hasPrefix("while down") {
                        late[index] = reply
                    } else {
                        answeredDuringStart += 1
                        if reply.slot != before[index]?.slot { elsewhereDuringStart += 1 }
                    }
                }
            }
            sleepMs(10)
        }
        #expect(late.count == 16, "\(late.count) of 16 datagrams sent while no daemon ran were answered")
        #expect(late.allSatisfy { $0.value.slot == before[$0.key]?.slot })
        #expect(answeredDuringStart == sentDuringStart,
                "\(answeredDuringStart) of \(sentDuringStart) datagrams sent while the daemon started were answered")
        print("restart with\(withArrays ? "" : "out") the stored arrays: \(answeredDuringStart) of \(sentDuringStart) "
            + "datagrams sent during the start answered, \(elsewhereDuringStart) from another slot than their flow's")
        if withArrays {
            #expect(elsewhereDuringStart == 0, "with the arrays the programs switch in one step: every datagram on its slot")
            #expect(second.log.contains("took over its stored socket arrays"), "\(second.logTail(10))")
        }

        let after = try Whoami.ask(clients, to: destination)
        let moved = zip(before, after).filter { $0?.slot != $1?.slot }.count
        #expect(moved == 0, "\(moved) of 64 flows changed slot")
        let oldPids = Set(before.compactMap { $0?.pid })
        #expect(after.allSatisfy { !oldPids.contains($0?.pid ?? 0) }, "new workers answer")
        #expect(second.stop() == 0)
    }

    @Test("stored sockets that do not check out are refused with the reason, dropped from the store, and replaced")
    func refusedSockets() throws {
        let config = serviceTable("fdbad", workers: 2, extra: "ready_after_ms = 200")
        // Slot 0: bound to another address; slot 1: a socket without SO_REUSEPORT.
        let elsewhere = try ReuseportSocket(endpoint: try Endpoint(parsing: "udp://127.0.0.2:0"))
        let plain = try Syscall.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), "plain")
        try Syscall.bind(plain.fd, SocketAddress(.loopbackV4, 0), "plain")
        let receiver = try Receiver(abstract: true)
        let daemon = try TestDaemon(config: config, environment: ["NOTIFY_SOCKET": receiver.address, "FDSTORE": "16"],
                                    listening: [(elsewhere.fd.rawValue, "svc.fdbad.l0.s0.g0"),
                                                (plain.fd.rawValue, "svc.fdbad.l0.s1.g0")])
        try #require(try receiver.waitFor { ServiceManagerTests.has($0, "READY=1") } != nil,
                     "no READY=1; log: \(daemon.logTail(10))")
        let log = daemon.log
        #expect(log.contains("refusing stored descriptor svc.fdbad.l0.s0.g0 (fd 3): bound to \(elsewhere.endpoint.address), not to 127.0.0.1:0"),
                "\(log)")
        #expect(log.contains("refusing stored descriptor svc.fdbad.l0.s1.g0 (fd 4): SO_REUSEPORT is not set"), "\(log)")
        #expect(log.contains("0 sockets reused, 2 refused, 2 stored"), "\(log)")
        // Each name is dropped before the new socket of that name is stored: a removal drops every
        // descriptor of its name.
        let order = receiver.messages.map(\.text).filter { $0.hasPrefix("FDSTORE") }
        #expect(order == ["FDSTOREREMOVE=1\nFDNAME=svc.fdbad.l0.s0.g0", "FDSTOREREMOVE=1\nFDNAME=svc.fdbad.l0.s1.g0",
                          "FDSTORE=1\nFDNAME=arr.fdbad.l0\nFDPOLL=0",
                          "FDSTORE=1\nFDNAME=svc.fdbad.l0.s0.g1", "FDSTORE=1\nFDNAME=svc.fdbad.l0.s1.g1"], "\(order)")
        let cookies = try Self.cookies(daemon, service: "fdbad", slots: 2)
        #expect(!cookies.contains(try elsewhere.cookie()) && cookies.allSatisfy { $0 != nil }, "new sockets at both slots")
        #expect(daemon.stop() == 0)
    }

    @Test("a scale-up stores the new slots' sockets, a scale-down and a removed service drop theirs, a rebuild replaces them")
    func storeFollowsTheSlots() throws {
        func config(_ workers: Int, name: String = "fdscale", rcvbuf: String = "",
                    program: String = "builtin = \"whoami\"") -> String {
            serviceTable(name, workers: workers, program: program,
                         extra: "ready_after_ms = 100\nflow_tracking = false\n\(rcvbuf)")
        }
        let receiver = try Receiver(abstract: true)
        let daemon = try TestDaemon(config: config(2), environment: ["NOTIFY_SOCKET": receiver.address, "FDSTORE": "16"])
        try #require(try receiver.waitFor { ServiceManagerTests.has($0, "READY=1") } != nil,
                     "no READY=1; log: \(daemon.logTail(10))")
        var seen = 0
        func storeMessages(after reload: String, waitMs: Int = 1500) throws -> [String] {
            try daemon.rewriteConfig(reload)
            let response = try daemon.request(ControlRequest(command: .reload))
            #expect(response.ok, "\(response.error ?? "")")
            try receiver.waitFor(timeoutMs: waitMs) { _ in false }
            defer { seen = receiver.messages.count }
            return receiver.messages.dropFirst(seen).map(\.text).filter { $0.hasPrefix("FDSTORE") && $0.contains("=svc.") }
                .map { $0.replacingOccurrences(of: "\n", with: " ") }
        }
        seen = receiver.messages.count
        #expect(try storeMessages(after: config(3)) == ["FDSTORE=1 FDNAME=svc.fdscale.l0.s2.g1"])
        #expect(try storeMessages(after: config(1)) == ["FDSTOREREMOVE=1 FDNAME=svc.fdscale.l0.s1.g1",
                                                        "FDSTOREREMOVE=1 FDNAME=svc.fdscale.l0.s2.g1"])
        // rcvbuf changes the sockets: the service is rebuilt on new ones under the same names.
        #expect(try storeMessages(after: config(1, rcvbuf: "rcvbuf = 262144"))
                == ["FDSTOREREMOVE=1 FDNAME=svc.fdscale.l0.s0.g1", "FDSTORE=1 FDNAME=svc.fdscale.l0.s0.g2"])
        #expect(try storeMessages(after: config(1, name: "fdother"))
                == ["FDSTORE=1 FDNAME=svc.fdother.l0.s0.g1", "FDSTOREREMOVE=1 FDNAME=svc.fdscale.l0.s0.g2"])
        // A new worker definition is an upgrade: a new generation on new slots, stored as they
        // start; the old generation's slot is dropped once it retired.
        #expect(try storeMessages(after: config(1, name: "fdother", program: "builtin = \"echo\""), waitMs: 4000)
                == ["FDSTORE=1 FDNAME=svc.fdother.l0.s1.g2", "FDSTOREREMOVE=1 FDNAME=svc.fdother.l0.s0.g1"])
        #expect(daemon.stop() == 0)
        try receiver.waitFor(timeoutMs: 200) { _ in false }
        #expect(receiver.messages.dropFirst(seen).allSatisfy { !$0.text.hasPrefix("FDSTORE") }, "a stop drops nothing")
    }
}
