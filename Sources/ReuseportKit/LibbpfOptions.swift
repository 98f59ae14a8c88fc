/// A libbpf options struct (`bpf_*_opts`) with every byte zero, padding included; the caller sets
/// `sz` (LIBBPF_OPTS() is a macro Swift cannot use). Swift's initializer zeroes the fields, not
/// necessarily the padding between and after them, and a newer libbpf than the headers built
/// against reads fields there (reuseportctl links the system's libbpf: 1.5 on trixie reads
/// `path_fd` where 1.1's bpf_obj_get_opts has padding, and a stray path_fd is EINVAL).
func zeroedOptions<Options>(_ options: Options) -> Options {
    var options = options
    withUnsafeMutableBytes(of: &options) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
    return options
}
