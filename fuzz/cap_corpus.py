#!/usr/bin/env python3
"""Greedy cap of a minimised corpus: from a libFuzzer merge control file,
pick at most N files, each time the one adding the most uncovered edges
(ties: the smaller file), until N files or nothing new. Prints the paths."""
import os, sys
ctl, n = sys.argv[1], int(sys.argv[2])
lines = open(ctl).read().split("\n")
count = int(lines[0]); files = lines[2:2 + count]
cov = {}
for l in lines[2 + count:]:
    if l.startswith("COV "):
        parts = l.split()
        cov[int(parts[1])] = set(parts[2:])
covered, chosen = set(), []
while len(chosen) < n:
    best = max(cov, key=lambda i: (len(cov[i] - covered), -os.path.getsize(files[i])), default=None)
    if best is None or not (cov[best] - covered):
        break
    covered |= cov.pop(best)
    chosen.append(files[best])
total = set().union(covered, *cov.values())
print(f"# {len(chosen)} files cover {len(covered)} of {len(total)} edges", file=sys.stderr)
print("\n".join(chosen))
