#!/usr/bin/env python3
"""The house's shape, checked (issue 15, "one way to do each thing"):

- every source file opens with a `//!` comment saying its role;
- README.md's role table names every source file, and every file it names
  exists (a folder entry such as `src/status/` covers the files in it);
- no function is over 80 lines (outside test modules), but for the ones
  listed in LONG below, each of which may not grow past its length today:
  a ratchet, so the list only shrinks.

Run: python3 tests/lint/structure.py   (prints "structure: N passed, M failed")
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
LIMIT = 80
# function (file:name) -> its length when it was last measured; none may grow.
LONG = {
}


def rust_files():
    for dp, _, fs in os.walk(os.path.join(ROOT, "src")):
        for f in sorted(fs):
            if f.endswith(".rs"):
                yield os.path.relpath(os.path.join(dp, f), ROOT)


def functions(path):
    """(name, first line, length) of each fn outside the #[cfg(test)] module
    (test modules sit at the end of the files here)."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        if re.match(r"\s*#\[cfg\(test\)\]", lines[i]):
            return
        m = re.match(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)", lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            s = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j])
            s = re.sub(r"'(\\.|[^'\\])'", "''", s)
            s = re.sub(r"//.*", "", s)
            for ch in s:
                if ch == "{":
                    depth, started = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if started and depth == 0:
                break
            if not started and s.rstrip().endswith(";"):
                break
            j += 1
        if started:
            yield m.group(7), i + 1, j - i + 1
            i = j + 1
        else:
            i += 1


def main():
    # Three checks, each failing with every offender listed.
    problems = {"role comments": [], "README role table": [], "function lengths": []}
    files = list(rust_files())
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = re.search(r"^\| Role \| File.*?\n((?:\|.*\n)+)", readme, re.M)
    if table is None:
        problems["README role table"].append("README.md has no role table (| Role | File | ...)")
    named = re.findall(r"`(src/[^`]*)`", table.group(1)) if table else []
    for f in files:
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            if not fh.readline().startswith("//!"):
                problems["role comments"].append(f"{f}: no //! comment on its first line saying its role")
        if not any(f == n or (n.endswith("/") and f.startswith(n)) for n in named):
            problems["README role table"].append(f"{f}: not in README.md's role table")
    for n in named:
        if not os.path.exists(os.path.join(ROOT, n)):
            problems["README role table"].append(f"README.md's role table names {n}, which does not exist")
    seen = set()
    for f in files:
        for name, line, n in functions(f):
            key = f"{f}:{name}"
            if key in LONG:
                seen.add(key)
                if n > LONG[key]:
                    problems["function lengths"].append(f"{key} (line {line}) is {n} lines, more than its {LONG[key]} when last measured")
            elif n > LIMIT:
                problems["function lengths"].append(f"{key} (line {line}) is {n} lines (at most {LIMIT})")
    for key in sorted(set(LONG) - seen):
        print(f"note: {key} is gone or under {LIMIT} lines: remove it from LONG")
    passed = failed = 0
    for what, bad in problems.items():
        print(f"{'ok  ' if not bad else 'FAIL:'} {what}")
        for b in bad:
            print(f"      {b}")
        passed, failed = passed + (not bad), failed + bool(bad)
    print(f"  {len(files)} source files; {len(LONG)} functions over {LIMIT} lines left on the list")
    print(f"structure: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
