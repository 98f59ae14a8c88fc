#if canImport(Glibc)
import Glibc
#endif
import CLibbpf
import SystemPackage
@_exported import CReuseportABI

/// An open BPF map: owns its fd and closes it once. Keys are `__u32` for every map of
/// bpf/dispatch.h except the flow records (`struct rp_flow_key`, the `key:` methods); values
/// are the C structs from that header.
public final class BPFMap: @unchecked Sendable {
    public let name: String
    private let descriptor: OwnedDescriptor
    /// The map's fd, for the libbpf calls of ReuseportKit; this object must outlive its use.
    var fd: Int32 { descriptor.fd.rawValue }
    public let type: UInt32
    public let keySize: Int
    public let valueSize: Int
    public let maxEntries: UInt32

    /// Takes ownership of `fd` and checks the map against the layout this build expects:
    /// a pinned map left by another version is refused with `.abiMismatch`.
    init(owning descriptor: OwnedDescriptor, name: String, keySize expectedKey: Int, valueSize expectedValue: Int) throws {
        var info = bpf_map_info()
        var length = UInt32(MemoryLayout<bpf_map_info>.size)
        if bpf_obj_get_info_by_fd(descriptor.fd.rawValue, &info, &length) != 0 {
            throw ReuseportError.system("bpf_obj_get_info_by_fd(\(name))", errno)
        }
        self.name = name
        self.descriptor = descriptor
        self.type = info.type
        self.keySize = Int(info.key_size)
        self.valueSize = Int(info.value_size)
        self.maxEntries = info.max_entries
        if keySize != expectedKey {
            throw ReuseportError.abiMismatch(map: name, field: "key", kernel: keySize, expected: expectedKey)
        }
        // A REUSEPORT_SOCKARRAY takes a u64 fd and answers a u64 cookie; its value_size
        // is whatever was declared, 8 here.
        if valueSize != expectedValue {
            throw ReuseportError.abiMismatch(map: name, field: "value", kernel: valueSize, expected: expectedValue)
        }
    }

    /// A new map of the daemon's own (bpf_map_create, the same privilege as loading the program:
    /// CAP_BPF, or root), not one of an object's: its records (bpf/records.h).
    convenience init(creating type: bpf_map_type, name: String, keySize: Int, valueSize: Int, maxEntries: UInt32,
                     flags: UInt32 = 0) throws {
        var options = zeroedOptions(bpf_map_create_opts())
        options.sz = MemoryLayout<bpf_map_create_opts>.size
        options.map_flags = flags
        let fd = bpf_map_create(type, name, UInt32(keySize), UInt32(valueSize), maxEntries, &options)
        if fd < 0 { throw ReuseportError.system("bpf_map_create(\(name))", errno) }
        try self.init(owning: OwnedDescriptor(adopting: FileDescriptor(rawValue: fd)), name: name, keySize: keySize,
                      valueSize: valueSize)
    }

    /// Opens the map pinned at `path` (bpf_obj_get). `readOnly`: the fd is BPF_F_RDONLY, and
    /// the kernel refuses every update and delete through it with EPERM (map_get_sys_perms(),
    /// kernel/bpf/syscall.c) whoever holds it, even after a fork, an exec or pidfd_getfd: for a
    /// reader that drops root, or that must never write what it was only meant to read.
    convenience init(pinnedAt path: String, name: String, keySize: Int, valueSize: Int, readOnly: Bool = false) throws {
        // `sz` ends at the last field set: a newer libbpf (1.5 has `path_fd` after `file_flags`)
        // then reads nothing more; a path_fd without BPF_F_PATH_FD is EINVAL (kernel/bpf/syscall.c,
        // bpf_obj_get()).
        var options = zeroedOptions(bpf_obj_get_opts())
        options.sz = MemoryLayout<bpf_obj_get_opts>.offset(of: \.file_flags)! + MemoryLayout<UInt32>.size
        options.file_flags = readOnly ? UInt32(BPF_F_RDONLY) : 0
        let fd = bpf_obj_get_opts(path, &options)
        if fd < 0 { throw ReuseportError.system(readOnly ? "bpf_obj_get(\(path), BPF_F_RDONLY)" : "bpf_obj_get(\(path))", errno) }
        try self.init(owning: OwnedDescriptor(adopting: FileDescriptor(rawValue: fd)), name: name, keySize: keySize,
                      valueSize: valueSize)
    }

    /// Runs `body` with the map's fd, keeping the map open meanwhile: for probes of the kernel's
    /// own answers (raw libbpf calls with exact errno) and for /proc/self/fdinfo.
    public func withDescriptor<Result>(_ body: (Int32) throws -> Result) rethrows -> Result {
        try withExtendedLifetime(self) { try body(fd) }
    }

    /// Pins the map at `path` (bpf_obj_pin); the path's folder must be on bpffs.
    public func pin(at path: String) throws {
        if bpf_obj_pin(fd, path) != 0 { throw ReuseportError.system("bpf_obj_pin(\(path))", errno) }
    }

    /// The value at `key`, or nil if the key has none (ENOENT).
    public func lookup<Value: BitwiseCopyable>(_ key: UInt32, as: Value.Type) throws -> Value? {
        precondition(MemoryLayout<Value>.size == valueSize, "value type does not match map \(name)")
        return try value(at: key, call: "bpf_map_lookup_elem(\(name)[\(key)])")
    }

    /// The one lookup both `lookup` methods make; `call` is what an error names.
    private func value<Key: BitwiseCopyable, Value: BitwiseCopyable>(at key: Key, call: @autoclosure () -> String)
        throws -> Value?
    {
        var key = key
        let value = UnsafeMutablePointer<Value>.allocate(capacity: 1)
        defer { value.deallocate() }
        if bpf_map_lookup_elem(fd, &key, value) != 0 {
            let code = errno
            if code == ENOENT { return nil }
            throw ReuseportError.system(call(), code)
        }
        return value.pointee
    }

    public func update<Value: BitwiseCopyable>(_ key: UInt32, _ value: Value, flags: UInt64 = UInt64(BPF_ANY)) throws {
        var key = key
        var value = value
        if bpf_map_update_elem(fd, &key, &value, flags) != 0 {
            throw ReuseportError.system("bpf_map_update_elem(\(name)[\(key)])", errno)
        }
    }

    /// Removes `key`; true if there was a value.
    @discardableResult
    public func delete(_ key: UInt32) throws -> Bool {
        var key = key
        if bpf_map_delete_elem(fd, &key) != 0 {
            let code = errno
            if code == ENOENT { return false }
            throw ReuseportError.system("bpf_map_delete_elem(\(name)[\(key)])", code)
        }
        return true
    }

    /// The value at a key of another type than `__u32` (struct rp_flow_key), or nil (ENOENT).
    public func lookup<Key: BitwiseCopyable, Value: BitwiseCopyable>(key: Key, as: Value.Type) throws -> Value? {
        precondition(MemoryLayout<Key>.size == keySize && MemoryLayout<Value>.size == valueSize,
                     "key or value type does not match map \(name)")
        return try value(at: key, call: "bpf_map_lookup_elem(\(name))")
    }

    /// Removes the entry at a key of another type than `__u32`; true if there was one.
    @discardableResult
    public func delete<Key: BitwiseCopyable>(key: Key) throws -> Bool {
        precondition(MemoryLayout<Key>.size == keySize, "key type does not match map \(name)")
        var key = key
        if bpf_map_delete_elem(fd, &key) != 0 {
            let code = errno
            if code == ENOENT { return false }
            throw ReuseportError.system("bpf_map_delete_elem(\(name))", code)
        }
        return true
    }

    /// Every entry of a hash map, read `chunk` at a time with BPF_MAP_LOOKUP_BATCH (5.6): a
    /// million records cost a few hundred system calls, not two million. Entries added or
    /// removed meanwhile may or may not be seen; none is seen twice.
    public func entries<Key: BitwiseCopyable, Value: BitwiseCopyable>(as type: (Key, Value).Type, chunk: Int = 4096) throws
        -> [(key: Key, value: Value)]
    {
        var result: [(key: Key, value: Value)] = []
        try forEachEntry(as: type, chunk: chunk) { result.append(($0, $1)) }
        return result
    }

    /// `entries`, one entry at a time: memory for one chunk only, however large the map.
    public func forEachEntry<Key: BitwiseCopyable, Value: BitwiseCopyable>(
        as: (Key, Value).Type, chunk: Int = 4096, _ body: (Key, Value) throws -> Void
    ) throws {
        precondition(MemoryLayout<Key>.size == keySize && MemoryLayout<Value>.size == valueSize,
                     "key or value type does not match map \(name)")
        let keys = UnsafeMutablePointer<Key>.allocate(capacity: chunk)
        let values = UnsafeMutablePointer<Value>.allocate(capacity: chunk)
        // The batch token of a hash map is a bucket index (u32); give it a key's room anyway.
        let token = UnsafeMutableRawPointer.allocate(byteCount: max(keySize, 8), alignment: 8)
        defer { keys.deallocate(); values.deallocate(); token.deallocate() }
        var options = zeroedOptions(bpf_map_batch_opts())
        options.sz = MemoryLayout<bpf_map_batch_opts>.size
        var first = true
        while true {
            var count = UInt32(chunk)
            let status = bpf_map_lookup_batch(fd, first ? nil : token, token, keys, values, &count, &options)
            let code = errno
            for index in 0..<Int(count) { try body(keys[index], values[index]) }
            if status != 0 {
                if code == ENOENT { return }
                throw ReuseportError.system("bpf_map_lookup_batch(\(name))", code)
            }
            first = false
        }
    }

    /// Writes entries in one call (BPF_MAP_UPDATE_BATCH, 5.6). Returns how many were written:
    /// fewer than given when a hash map filled up (E2BIG).
    @discardableResult
    func updateBatch<Key: BitwiseCopyable, Value: BitwiseCopyable>(_ keys: [Key], _ values: [Value]) throws -> Int {
        precondition(keys.count == values.count && MemoryLayout<Key>.size == keySize
                     && MemoryLayout<Value>.size == valueSize, "batch does not match map \(name)")
        var options = zeroedOptions(bpf_map_batch_opts())
        options.sz = MemoryLayout<bpf_map_batch_opts>.size
        options.elem_flags = UInt64(BPF_ANY)
        var count = UInt32(keys.count)
        let status = keys.withUnsafeBufferPointer { keyBuffer in
            values.withUnsafeBufferPointer { valueBuffer in
                bpf_map_update_batch(fd, keyBuffer.baseAddress, valueBuffer.baseAddress, &count, &options)
            }
        }
        if status != 0 {
            let code = errno
            if code == E2BIG { return Int(count) }
            throw ReuseportError.system("bpf_map_update_batch(\(name))", code)
        }
        return Int(count)
    }

    /// The values of all possible CPUs at `key` of a per-CPU map.
    public func lookupPerCPU<Value: BitwiseCopyable>(_ key: UInt32, as: Value.Type) throws -> [Value] {
        precondition(MemoryLayout<Value>.size == valueSize, "value type does not match map \(name)")
        let cpus = Int(libbpf_num_possible_cpus())
        guard cpus > 0 else { throw ReuseportError.system("libbpf_num_possible_cpus", -Int32(cpus)) }
        // Each CPU's value is padded to 8 bytes in the buffer (kernel/bpf/syscall.c, bpf_map_copy_value()).
        let stride = (valueSize + 7) & ~7
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: stride * cpus, alignment: 8)
        defer { buffer.deallocate() }
        var key = key
        if bpf_map_lookup_elem(fd, &key, buffer) != 0 {
            throw ReuseportError.system("bpf_map_lookup_elem(\(name)[\(key)])", errno)
        }
        return (0..<cpus).map { buffer.load(fromByteOffset: $0 * stride, as: Value.self) }
    }
}
