import CReuseportABI

extension PlacementModel {
    /// What must hold of every placement, after every operation, written once: the model's
    /// tests check it after each step of random sequences, and `ServiceDataPlane` after each
    /// operation on the real maps (its `invariantViolations`, in status). Each broken one is a
    /// sentence naming the slots or buckets; empty when all hold.
    public func violations() -> [String] {
        var found: [String] = []
        let held = Set(slotGenerations.keys)
        // A slot closed on purpose is a hole the tables may name (its flows fall back).
        let steerable = held.union(closed)
        func check(_ holds: Bool, _ sentence: @autoclosure () -> String) { if !holds { found.append(sentence()) } }
        func list<S: Sequence>(_ slots: S) -> String where S.Element == UInt32 {
            slots.sorted().map(String.init).joined(separator: ", ")
        }

        // Sizes.
        check(buckets.count == bucketCount && effectiveBuckets.count == bucketCount && bucketFlags.count == bucketCount,
              "the tables have \(buckets.count), \(effectiveBuckets.count), \(bucketFlags.count) buckets, not \(bucketCount)")
        check(fallback.count == Int(RP_FALLBACK_BUCKETS), "the fallback table has \(fallback.count) entries")
        check(!slots.isEmpty && slots.count <= Int(RP_MAX_SLOTS), "the set has \(slots.count) slots")
        let past = held.filter { Int($0) >= slotCapacity }
        check(past.isEmpty, "slots \(list(past)) are past the \(slotCapacity) the maps hold")

        // Every slot a table or a role names holds a socket.
        check(Set(slots).isSubset(of: steerable), "slots \(list(Set(slots).subtracting(steerable))) are in the set but hold no socket")
        check(leaving.isSubset(of: held), "leaving slots \(list(leaving.subtracting(held))) hold no socket")
        let pendingSlots = Set(pending?.slots ?? [])
        check(pendingSlots.isSubset(of: held), "the change's target slots \(list(pendingSlots.subtracting(held))) hold no socket")
        let named = Set(effectiveBuckets)
        check(named.isSubset(of: steerable), "rp_buckets names slots \(list(named.subtracting(steerable))) that hold no socket")
        if let pending {
            let next = Set(pending.effective)
            check(next.isSubset(of: held), "the switch would name slots \(list(next.subtracting(held))) that hold no socket")
        }

        // Roles exclude each other.
        check(leaving.isDisjoint(with: slots), "slots \(list(leaving.intersection(slots))) are both in the set and leaving")
        check(leaving.isDisjoint(with: pendingSlots),
              "slots \(list(leaving.intersection(pendingSlots))) are both leaving and joining at the switch")
        if let starting = startingGeneration {
            let startingSlots = Set(starting.slots)
            check(startingSlots.isSubset(of: held), "the starting generation's slots \(list(startingSlots.subtracting(held))) hold no socket")
            check(startingSlots.isDisjoint(with: Set(slots).union(leaving).union(pendingSlots)),
                  "the starting generation's slots \(list(startingSlots.intersection(Set(slots).union(leaving).union(pendingSlots)))) have another role")
            check(starting.slots.allSatisfy { slotGenerations[$0] == starting.generation },
                  "the starting generation's slots are not all of generation \(starting.generation)")
            check(starting.generation > workingGeneration && starting.generation <= lastGeneration,
                  "the starting generation \(starting.generation) is not newer than the working \(workingGeneration)")
            // Only a switched canary's buckets name them, each at the slot promotion gives it.
            let assignment = canary?.switched == true ? canary!.assignment : [:]
            let stray = effectiveBuckets.indices.filter {
                startingSlots.contains(effectiveBuckets[$0]) && assignment[$0] != effectiveBuckets[$0]
            }
            check(stray.isEmpty, "rp_buckets names the starting generation's slots in \(stray.count) buckets that are no canary's")
        }
        if let canary {
            check(startingGeneration.map { $0.generation == canary.generation && $0.slots == canary.slots } == true,
                  "the canary of generation \(canary.generation) is not the starting generation")
            check(!canary.buckets.isEmpty && canary.buckets.count < bucketCount && canary.buckets == Array(Set(canary.buckets)).sorted()
                  && canary.buckets.allSatisfy { (0..<bucketCount).contains($0) },
                  "the canary's buckets are not distinct buckets of the table, some but not all")
            // Promotion moves only the buckets the canary does not hold: the fewest.
            check(canary.promoted == BucketAssignment.rebalance(buckets, to: canary.slots),
                  "the canary's buckets do not point where promotion puts them")
            if canary.switched {
                check(canary.buckets.allSatisfy { effectiveBuckets[$0] == canary.promoted[$0] },
                      "a switched canary's buckets do not all name its slots")
            } else {
                check(pending?.canary == canary.assignment, "a canary that has not switched has no change learning it")
            }
        }
        if let pending, !pending.canary.isEmpty {
            check(canary?.assignment == pending.canary, "the pending change carries buckets of no canary")
        }
        let namedLeaving = leaving.intersection(named)
        if !namedLeaving.isEmpty {
            check(pending.map { Set($0.effective).isDisjoint(with: namedLeaving) } == true,
                  "leaving slots \(list(namedLeaving)) take new flows and no pending switch takes them away")
        }
        let roles = Set(slots).union(pendingSlots).union(leaving).union(startingGeneration?.slots ?? [])
        check(held.isSubset(of: roles), "slots \(list(held.subtracting(roles))) hold sockets but have no role")
        check(failedOver.isSubset(of: Set(slots)), "failed-over slots \(list(failedOver.subtracting(slots))) are not in the set")

        // Generations.
        check(workingGeneration >= 1 && workingGeneration <= lastGeneration,
              "the working generation \(workingGeneration) is not within 1...\(lastGeneration)")
        check(slotGenerations.values.allSatisfy { $0 >= 1 && $0 <= lastGeneration },
              "a slot has a generation above the last given out, \(lastGeneration)")
        let setGenerations = Set(slots.compactMap { slotGenerations[$0] })
        check(setGenerations.isSubset(of: [workingGeneration]),
              "the set's slots are of generations \(list(setGenerations)), not only the working \(workingGeneration)")
        if let generation = pendingGeneration {
            check(pending != nil, "generation \(generation) is to become the working one, but no change is pending")
            check(pendingSlots.allSatisfy { slotGenerations[$0] == generation },
                  "the change to generation \(generation) targets slots of another generation")
        }

        // The change: flags, records and deadlines only while one runs.
        if transitionStartedNs == nil {
            check(pending == nil, "a change is pending but none has started")
            check(leaving.isEmpty, "slots \(list(leaving)) leave but no change runs")
            check(bucketFlags.allSatisfy { $0 == 0 }, "buckets are flagged but no change runs")
            check(drainDeadlineNs == nil, "a drain deadline is set but no change runs")
        }
        check(bucketFlags.allSatisfy { $0 & ~UInt32(RP_BUCKET_FLAGS) == 0 }, "a bucket's flags are not RP_BUCKET_* flags")
        if !tracksFlows { check(bucketFlags.allSatisfy { $0 == 0 }, "buckets are flagged but flows are not tracked") }
        if pending == nil {
            check(bucketFlags.allSatisfy { $0 & UInt32(RP_BUCKET_LEARN) == 0 }, "buckets learn but no change is pending")
        }

        // The fallback table names only slots that take new flows, whenever there are some.
        let takers = Set(fallbackSlots)
        if !takers.isEmpty {
            let stray = Set(fallback).subtracting(takers)
            check(stray.isEmpty, "the fallback table names slots \(list(stray)) that take no new flow")
        }
        return found
    }
}
