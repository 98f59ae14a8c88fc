# The man pages of swift-argument-parser's generate-manual, finished for installing:
# - internal subcommands (shouldDisplay: false, which the plugin does not honour) are left out:
#   every `.It Em NAME` entry named in HIDDEN (space-separated), up to the next entry;
# - the EXIT STATUS section's `.Ex -std` ("exits 0 on success, >0 if an error occurs") becomes
#   the list in the file EXIT (what each status means, as main decides it).
# Usage: awk -v HIDDEN="exec-worker check-config" -v EXIT=dist/man/X.exit-status -f finish.awk X.8
BEGIN { split(HIDDEN, names, " "); for (i in names) hidden[names[i]] = 1 }
/^\.It Em / { skipping = ($3 in hidden) }
/^\.It Em help$/ { skipping = 0 }
/^\.Sh / { skipping = 0 }
/^\.Ex -std/ {
    while ((getline line < EXIT) > 0) print line
    replaced = 1
    next
}
!skipping { print }
END { if (!replaced) { print "finish.awk: no .Ex -std in the page" > "/dev/stderr"; exit 1 } }
