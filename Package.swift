// swift-tools-version:6.0
import PackageDescription

// The layout mirrors the architecture:
//   bpf/                      the data plane (BPF C + the one ABI header, bpf/dispatch.h)
//   Sources/CLibbpf           libbpf, as a system library
//   Sources/CReuseportABI     the ABI header and the compiled BPF object, for Swift
//   Sources/ReuseportKit      typed Swift over libbpf and sockets: load, attach, slots, buckets, counters, pins;
//                             System/ is the one system layer (owned fds, syscalls, spawn, wait, clock)
//   Sources/ReuseportControl  the control-socket protocol between the daemon and the CLI
//   Sources/CReuseportVersion the build's version, from the header `make` writes into .output/
//   Sources/ReuseportDaemon   configuration, supervision, built-in workers (the daemon as a library)
//   Sources/CReuseportProcess signalfd, prctl, pidfd_open, SO_PEERCRED: calls Swift cannot import
//   Sources/reuseportd        the daemon executable
//   Sources/reuseportctl      the operator CLI
//   Sources/CSockDiag         sock_diag/netlink and capability uapi (per-socket queues and drops: ReuseportKit's
//                             SocketDiagnostics, for the CLI and the daemon's stall check)
//   Sources/kernel-check      the kernel-feature suite, run on the host and inside VMs
//   Sources/reuseport-bench   the benchmark suite (Sources/CReuseportBench: the libc calls it needs)
//   Sources/ReuseportTestSupport  real-socket helpers for the tests, kernel-check and the bench
//                             (Sources/CReuseportTestPrograms: BPF objects built only for tests)
//   Sources/ReuseportTestTraits   Swift Testing traits of the test targets (the threads tests block on)
//   Tests/fuzz                the fuzz targets of `make fuzz`, their seed corpora and dictionaries
let package = Package(
    name: "reuseportd",
    products: [
        .executable(name: "reuseportd", targets: ["reuseportd"]),
        .executable(name: "reuseportctl", targets: ["reuseportctl"]),
        .executable(name: "kernel-check", targets: ["kernel-check"]),
        .executable(name: "reuseport-bench", targets: ["reuseport-bench"]),
        .library(name: "ReuseportKit", targets: ["ReuseportKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // 1.16.2: LogHandler.log(event:) (JournalLogHandler).
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        // Only reuseportctl's metrics endpoint uses these two: the exposition format and a small
        // HTTP server without SwiftNIO (FlyingFox), to keep clean builds short.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
        // Tests only: property-based sequences with shrinking (PlacementPropertyTests).
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
    ],
    targets: [
        .systemLibrary(name: "CLibbpf", pkgConfig: "libbpf", providers: [.apt(["libbpf-dev", "libelf-dev", "zlib1g-dev"])]),
        // Includes bpf/dispatch.h and embeds the BPF object that `make` builds into .output/.
        .target(name: "CReuseportABI"),
        // signalfd, prctl, pidfd_open, SO_PEERCRED for the system layer (Glibc does not export them to Swift).
        .target(name: "CReuseportProcess"),
        .target(
            name: "ReuseportKit",
            dependencies: [
                "CLibbpf", "CReuseportABI", "CReuseportProcess", "CSockDiag",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // The version string of both binaries: `make` writes .output/version.h (see the Makefile).
        .target(name: "CReuseportVersion"),
        .target(
            name: "ReuseportControl",
            dependencies: ["ReuseportKit", "CReuseportVersion"]
        ),
        .target(
            name: "ReuseportDaemon",
            dependencies: [
                "ReuseportKit", "ReuseportControl",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ]
        ),
        .executableTarget(
            name: "reuseportd",
            dependencies: [
                "ReuseportDaemon",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // sock_diag and capability uapi (per-socket queues and drops, privilege probes).
        .target(name: "CSockDiag"),
        .executableTarget(
            name: "reuseportctl",
            dependencies: [
                "ReuseportKit", "ReuseportControl", "CLibbpf", "CSockDiag",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "FlyingFox", package: "FlyingFox"),
                .product(name: "FlyingSocks", package: "FlyingFox"),
            ]
        ),
        .executableTarget(
            name: "kernel-check",
            dependencies: ["ReuseportKit", "ReuseportControl", "ReuseportTestSupport"]
        ),
        .executableTarget(
            name: "reuseport-bench",
            dependencies: [
                "ReuseportKit", "ReuseportTestSupport", "CReuseportBench", "CLibbpf",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // sendmmsg/recvmmsg and epoll, which Swift's Glibc module does not declare.
        .target(name: "CReuseportBench"),
        // Real-socket helpers (clients from many source ports, receive with deadline) shared by
        // the tests, the kernel-feature suite and the benchmarks.
        // The one test daemon launcher, whoami parser and steering scenarios as well.
        .target(name: "ReuseportTestSupport", dependencies: ["ReuseportKit", "ReuseportControl", "CReuseportTestPrograms"]),
        // BPF objects built only for the tests (bpf/too_large.bpf.c), embedded like CReuseportABI's.
        .target(name: "CReuseportTestPrograms"),
        // Swift Testing traits the test targets share: the harness's own threads for tests that block.
        .target(name: "ReuseportTestTraits"),
        // libFuzzer targets for the two inputs from outside the root daemon (docs/fuzzing.md):
        // `make fuzz` builds them with -sanitize=fuzzer in .build-fuzz; the normal build makes
        // tools that replay inputs through the same checks.
        .target(name: "FuzzDriver", path: "Tests/fuzz/FuzzDriver"),
        .executableTarget(
            name: "fuzz-config", dependencies: ["FuzzDriver", "ReuseportDaemon"], path: "Tests/fuzz/fuzz-config"
        ),
        .executableTarget(
            name: "fuzz-control", dependencies: ["FuzzDriver", "ReuseportDaemon", "ReuseportControl"],
            path: "Tests/fuzz/fuzz-control"
        ),
        // The benchmark's own arithmetic and parsing (no timings).
        .testTarget(name: "ReuseportBenchTests", dependencies: ["reuseport-bench", "ReuseportTestSupport", "ReuseportTestTraits"]),
        .testTarget(name: "ReuseportKitTests", dependencies: [
            "ReuseportKit", "ReuseportTestSupport", "ReuseportTestTraits", "CReuseportABI", "CLibbpf",
            .product(name: "PropertyBased", package: "swift-property-based"),
        ]),
        // Runs the built reuseportctl (and reuseportd) as subprocesses against real pins and sockets.
        // CLibbpf: raw map calls on descriptors copied out of the metrics server (their exact errno).
        // reuseportctl: its registry of metric families, which the docs' tables are held to.
        .testTarget(name: "ReuseportctlTests", dependencies: ["ReuseportKit", "ReuseportTestSupport", "ReuseportTestTraits",
                                                             "ReuseportControl", "CLibbpf", "reuseportctl"],
                    exclude: ["golden"]),
        // Runs the real reuseportd binary (built beside the test bundle) against real sockets; and the
        // supervisor's decisions in process (SlotLifecycle), with random sequences of events.
        .testTarget(
            name: "ReuseportDaemonTests",
            dependencies: ["ReuseportDaemon", "ReuseportControl", "ReuseportKit", "ReuseportTestSupport",
                           "ReuseportTestTraits", .product(name: "PropertyBased", package: "swift-property-based")]
        ),
    ],
    // C23 for #embed of the BPF object (Sources/CReuseportABI/object.c).
    cLanguageStandard: .gnu2x
)
