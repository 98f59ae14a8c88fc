import ArgumentParser

struct KernelWorker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kernel-worker", abstract: "A whoami worker owning its own socket (item 3's kernel default).",
        shouldDisplay: false)

    func run() throws {}
}
