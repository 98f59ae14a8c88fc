#!/usr/bin/env bash
# Prints the results of a vmtest run as tables: check x kernel (PASS/FAIL/SKIP, "-" when
# the kernel did not report it), then the recorded values. Also writes both as Markdown
# to RESULTS/table.md (docs/kernel-support.md quotes it).
#
#   Tests/vm/table.sh RESULTS LABEL...     (reads RESULTS/LABEL.txt, written by run.sh)
set -euo pipefail

results=${1:?usage: table.sh RESULTS LABEL...}
shift
files=()
for label in "$@"; do files+=("$results/$label.txt"); done

awk -v md="$results/table.md" '
    FNR == 1 { k++; label[k] = FILENAME; sub(/.*\//, "", label[k]); sub(/\.txt$/, "", label[k]) }
    $1 == "KERNEL" { release[k] = $2 }
    $1 == "CHECK" {
        if (!($2 in seen)) { seen[$2] = 1; checks[++nc] = $2 }
        result[$2, k] = $3
    }
    $1 == "VALUE" {
        split($3, kv, "="); key = $2 " " kv[1]
        if (!(key in vseen)) { vseen[key] = 1; keys[++nv] = key }
        value = $0; sub(/^VALUE [^ ]* [^=]*=/, "", value)
        values[key, k] = value
    }
    $1 == "VM-TIME" { split($2, t, "="); total[k] = t[2]; split($3, b, "="); boot[k] = b[2] }
    function cell(table, row, col) { return ((row, col) in table) ? table[row, col] : "-" }
    function rule(n,   s, i) { s = "|"; for (i = 0; i < n; i++) s = s " --- |"; return s }
    END {
        w = 5; for (i = 1; i <= nc; i++) if (length(checks[i]) > w) w = length(checks[i])
        printf "\n%-" w "s", "check"; for (j = 1; j <= k; j++) printf "  %-6s", label[j]; printf "\n"
        for (i = 1; i <= nc; i++) {
            printf "%-" w "s", checks[i]
            for (j = 1; j <= k; j++) printf "  %-6s", cell(result, checks[i], j)
            printf "\n"
        }
        printf "%-" w "s", "boot/total s"; for (j = 1; j <= k; j++) printf "  %-6s", (j in total) ? boot[j] "/" total[j] : "-"
        printf "\n"

        vw = 5; for (i = 1; i <= nv; i++) if (length(keys[i]) > vw) vw = length(keys[i])
        for (j = 1; j <= k; j++) {
            cw[j] = length(label[j])
            for (i = 1; i <= nv; i++) if (length(cell(values, keys[i], j)) > cw[j]) cw[j] = length(cell(values, keys[i], j))
        }
        printf "\n%-" vw "s", "recorded value"; for (j = 1; j <= k; j++) printf "  %-" cw[j] "s", label[j]; printf "\n"
        for (i = 1; i <= nv; i++) {
            printf "%-" vw "s", keys[i]
            for (j = 1; j <= k; j++) printf "  %-" cw[j] "s", cell(values, keys[i], j)
            printf "\n"
        }

        printf "| check |" > md; for (j = 1; j <= k; j++) printf " %s |", label[j] > md; printf "\n%s\n", rule(k + 1) > md
        printf "| kernel |" > md; for (j = 1; j <= k; j++) printf " %s |", (j in release) ? release[j] : "-" > md; printf "\n" > md
        for (i = 1; i <= nc; i++) {
            printf "| %s |", checks[i] > md
            for (j = 1; j <= k; j++) printf " %s |", cell(result, checks[i], j) > md
            printf "\n" > md
        }
        printf "| boot / total (s) |" > md; for (j = 1; j <= k; j++) printf " %s |", (j in total) ? boot[j] " / " total[j] : "-" > md
        printf "\n\n| recorded value |" > md; for (j = 1; j <= k; j++) printf " %s |", label[j] > md; printf "\n%s\n", rule(k + 1) > md
        for (i = 1; i <= nv; i++) {
            printf "| %s |", keys[i] > md
            for (j = 1; j <= k; j++) printf " %s |", cell(values, keys[i], j) > md
            printf "\n" > md
        }
    }
' "${files[@]}" | sed 's/ *$//'
