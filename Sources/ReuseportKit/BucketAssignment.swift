/// The bucket table: which slot each bucket's flows go to.
///
/// Every slot holds ⌊B/N⌋ or ⌈B/N⌉ of the B buckets, and a change of the slot set moves
/// as few buckets as that allows: a bucket stays where it is while its slot is kept and
/// under its quota. Growing N → N+1 moves B/(N+1) buckets, the least possible.
public enum BucketAssignment {
    /// A fresh table: bucket i → slots[i mod N].
    public static func initial(bucketCount: Int, slots: [UInt32]) -> [UInt32] {
        precondition(!slots.isEmpty && bucketCount > 0, "a bucket table needs buckets and slots")
        let slots = slots.sorted()
        return (0..<bucketCount).map { slots[$0 % slots.count] }
    }

    /// `current` re-spread over `slots`, moving the fewest buckets.
    public static func rebalance(_ current: [UInt32], to slots: [UInt32]) -> [UInt32] {
        precondition(!slots.isEmpty && !current.isEmpty, "a bucket table needs buckets and slots")
        let slots = Array(Set(slots)).sorted()
        let base = current.count / slots.count
        var extra = current.count % slots.count

        // The ⌈B/N⌉ quotas go to the slots that hold the most buckets now: that keeps most.
        var held: [UInt32: Int] = [:]
        for slot in current { held[slot, default: 0] += 1 }
        var quota: [UInt32: Int] = [:]
        for slot in slots.sorted(by: { (held[$0] ?? 0, $1) > (held[$1] ?? 0, $0) }) {
            quota[slot] = base + (extra > 0 ? 1 : 0)
            if extra > 0 { extra -= 1 }
        }

        var table = current
        var free: [Int] = []
        var kept: [UInt32: Int] = [:]
        for (bucket, slot) in current.enumerated() {
            if let limit = quota[slot], kept[slot, default: 0] < limit {
                kept[slot, default: 0] += 1
            } else {
                free.append(bucket)
            }
        }
        var next = free.makeIterator()
        for slot in slots {
            for _ in kept[slot, default: 0]..<quota[slot]! {
                table[next.next()!] = slot
            }
        }
        return table
    }

    /// `nominal` with the buckets of the `failed` slots spread over the other `slots`, moving no
    /// other bucket (none failed, or all: `nominal` as it is).
    public static func overlay(_ nominal: [UInt32], slots: [UInt32], failed: Set<UInt32>) -> [UInt32] {
        let live = slots.filter { !failed.contains($0) }
        return live.isEmpty || live.count == slots.count ? nominal : rebalance(nominal, to: live)
    }

    /// `table` with the buckets of `slot` given, one by one, to whichever of `live` holds the
    /// fewest (the lowest index on a tie): only `slot`'s buckets move, whatever the table was
    /// (a failover on top of another, or a table a restart took over unbalanced).
    public static func lend(_ table: [UInt32], from slot: UInt32, to live: [UInt32]) -> [UInt32] {
        precondition(!live.isEmpty, "buckets are lent to at least one slot")
        var held: [UInt32: Int] = Dictionary(uniqueKeysWithValues: live.map { ($0, 0) })
        for named in table where held[named] != nil { held[named]! += 1 }
        var lent = table
        for (bucket, named) in table.enumerated() where named == slot {
            let taker = live.min { (held[$0]!, $0) < (held[$1]!, $1) }!
            lent[bucket] = taker
            held[taker]! += 1
        }
        return lent
    }

    /// How many buckets differ between two tables of the same size.
    public static func moved(from old: [UInt32], to new: [UInt32]) -> Int {
        zip(old, new).reduce(0) { $0 + ($1.0 == $1.1 ? 0 : 1) }
    }
}
