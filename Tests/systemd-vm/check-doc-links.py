#!/usr/bin/env python3
"""Every relative link in the installed Markdown docs resolves: the file (or folder) it names
exists in the installed tree, and an anchor (#section) names a heading of the Markdown file it
points into (GitHub's slugs: lower case, punctuation dropped, spaces become hyphens).

    check-doc-links.py ROOT DOCDIR     (ROOT: the unpacked package; DOCDIR: /usr/share/doc/reuseportd)

Prints each broken link with its file and line, and the count of links checked; exits 1 if any is broken."""
import os
import re
import sys

root, docdir = sys.argv[1], sys.argv[2]
base = os.path.join(root, docdir.lstrip("/"))
link = re.compile(r"\]\(([^)\s]+)\)")
fence = re.compile(r"^\s*(```|~~~)")


def slugs(path):
    found, inside = set(), False
    counts = {}
    for line in open(path, encoding="utf-8"):
        if fence.match(line):
            inside = not inside
        if inside or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


checked, broken = 0, []
for folder, _, files in os.walk(base):
    for name in sorted(files):
        if not name.endswith(".md"):
            continue
        path = os.path.join(folder, name)
        inside = False
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if fence.match(line):
                inside = not inside
            if inside:
                continue
            for target in link.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, file:, man:
                checked += 1
                file, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(folder, file)) if file else path
                where = f"{os.path.relpath(path, root)}:{number}: {target}"
                if not os.path.exists(resolved):
                    broken.append(f"{where}: no {os.path.relpath(resolved, root)}")
                elif anchor and resolved.endswith(".md") and anchor not in slugs(resolved):
                    broken.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, root)}")
for line in broken:
    print(line)
print(f"{checked} relative links checked in {docdir}, {len(broken)} broken")
sys.exit(1 if broken else 0)
