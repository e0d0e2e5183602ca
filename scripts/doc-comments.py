#!/usr/bin/env python3
"""Turns the plain comments of hmmkit's public headers into Doxygen comments (a one-off developer tool).

Usage: scripts/doc-comments.py [--check] [FILE...]
Without FILE it rewrites every tracked file under */include/hmmkit/. --check only lists the
files it would change and exits 1 if there is any (the tool is idempotent: a second run changes nothing).

What it does, in public headers only:
  - the comment block at the top of the file becomes "/// @file" followed by the block as "///" lines
    (a C "/* ... */" block becomes "/** @file ... */");
  - a "//" comment block directly above a declaration (no blank line between) becomes "///"
    (a C "/* ... */" block: "/** ... */");
  - a trailing "// x" after a declaration on the same line becomes "///< x" (C: "/**< x */"); a comment
    line aligned under such a trailing comment continues it ("///<").
Left alone: section separators ("// ---- x ----"), "// NOLINT...", "// clang-format ...", comments
inside function bodies and initialisers, free-standing comments (a blank line before the next
declaration), comments above access specifiers, closing braces and preprocessor lines other than
#define, and anything inside string or character literals.
"""

import re
import subprocess
import sys
from pathlib import Path

KEEP = re.compile(r"^//\s*(-{3,}|={3,}|NOLINT|clang-format)")
SCOPE_HEAD = re.compile(r"^(template\s*<.*>\s*)?(typedef\s+)?(namespace|class|struct|union|enum)\b|^extern\s*\"")


def split_code(line, in_block):
    """Returns (code, comment_col, comment_kind, in_block_after) for one line.

    code has string/char contents replaced by spaces so braces inside them do not count; comment_col
    is the column of the first comment ("//" or "/*") outside literals, or -1."""
    out = []
    i, n = 0, len(line)
    col, kind = -1, None
    while i < n:
        if in_block:
            end = line.find("*/", i)
            if end < 0:
                return "".join(out), col, kind, True
            out.append(" " * (end + 2 - i))
            i = end + 2
            in_block = False
            continue
        c = line[i]
        if c in "\"'":
            j = i + 1
            while j < n and line[j] != c:
                j += 2 if line[j] == "\\" else 1
            out.append(c + " " * (min(j, n) - i - 1) + (c if j < n else ""))
            i = j + 1
            continue
        if line.startswith("//", i):
            if col < 0:
                col, kind = i, "//"
            break
        if line.startswith("/*", i):
            if col < 0:
                col, kind = i, "/*"
            in_block = True
            out.append("  ")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), col, kind, in_block


class Scanner:
    """Tracks whether each line starts in a declaration scope (file, namespace, class, enum) or a body."""

    def __init__(self):
        self.stack = []  # True: declaration scope, False: body/initialiser
        self.pending = ""  # code since the last ; { or }
        self.parens = 0
        self.in_block = False

    def at_scope(self):
        return all(self.stack) and self.parens == 0

    def feed(self, line):
        code, col, kind, self.in_block = split_code(line, self.in_block)
        if code.lstrip().startswith("#"):
            return code, col, kind
        for c in code:
            if c == "(":
                self.parens += 1
            elif c == ")":
                self.parens = max(0, self.parens - 1)
            if c == "{":
                # Attributes and annotation macros (alignas(64), [[nodiscard]], CAPABILITY("mutex")) are
                # not parentheses of a function head.
                head = re.sub(r"alignas\([^)]*\)|\[\[.*?\]\]|\b[A-Z][A-Z_]+\([^)]*\)", "",
                              self.pending).strip()
                scope = bool(SCOPE_HEAD.match(head)) and "(" not in head and "=" not in head
                self.stack.append(scope and self.at_scope())
                self.pending = ""
            elif c == "}":
                if self.stack:
                    self.stack.pop()
                self.pending = ""
            elif c == ";":
                self.pending = ""
            elif c == ":" and re.search(r"\b(public|private|protected)\s*$", self.pending):
                self.pending = ""  # an access specifier ends nothing but starts the next declaration
            else:
                self.pending += c
        return code, col, kind


def is_comment_line(line):
    s = line.lstrip()
    return s.startswith("//") or s.startswith("/*")


def documents_next(line):
    """Whether a declaration-scope line is one a comment above it documents."""
    s = line.strip()
    if not s or s.startswith("}") or s.startswith("#") and not s.startswith("#define"):
        return False
    if re.match(r"^(public|private|protected)\s*:", s):
        return False
    return True


def convert(text):
    lines = text.split("\n")
    out = list(lines)
    n = len(lines)

    # 1. The top-of-file block.
    first = 0
    while first < n and not lines[first].strip():
        first += 1
    top_end = first
    if first < n and lines[first].startswith("//") and not lines[first].startswith("///"):
        end = first
        while end < n and lines[end].startswith("//"):
            end += 1
        block = ["/// @file"] + ["///" + line[2:] for line in lines[first:end]]
        out[first:end] = [None] * (end - first)
        out[first] = "\n".join(block)
        top_end = end
    elif first < n and lines[first].startswith("/*") and not lines[first].startswith("/**"):
        end = first
        while end < n and "*/" not in lines[end]:
            end += 1
        out[first] = "/** @file\n *" + lines[first][2:] if lines[first][2:].strip() else "/** @file"
        top_end = end + 1

    # 2. Scan the rest with scope tracking.
    sc = Scanner()
    scope_at = [True] * n  # whether the line starts in declaration scope
    info = [None] * n
    for i in range(n):
        scope_at[i] = sc.at_scope() and not sc.in_block
        info[i] = sc.feed(lines[i])

    i = top_end
    last_trailing = None  # (line index, column) of the last trailing comment turned into ///<
    while i < n:
        line = lines[i]
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not scope_at[i]:
            last_trailing = None
            i += 1
            continue
        if stripped.startswith("//") and not stripped.startswith("///"):
            if last_trailing and last_trailing[0] == i - 1 and indent == last_trailing[1] and indent > 0:
                out[i] = line[:indent] + "///<" + stripped[2:]
                last_trailing = (i, indent)
                i += 1
                continue
            # A block of // lines; the part after the last kept line documents the next line.
            j = i
            while j < n and lines[j].lstrip().startswith("//") and scope_at[j]:
                j += 1
            block = list(range(i, j))
            nxt = j
            if nxt < n and documents_next(lines[nxt]) and scope_at[nxt]:
                start = i
                for k in block:
                    if KEEP.match(lines[k].lstrip()):
                        start = k + 1
                for k in block[start - i:]:
                    s = lines[k].lstrip()
                    if s.startswith("///") or KEEP.match(s):
                        continue
                    ind = len(lines[k]) - len(s)
                    out[k] = lines[k][:ind] + "///" + s[2:]
            last_trailing = None
            i = j
            continue
        if stripped.startswith("/*") and not stripped.startswith("/**"):
            j = i
            while j < n and "*/" not in lines[j]:
                j += 1
            nxt = j + 1
            tail = lines[j][lines[j].find("*/") + 2:].strip() if j < n else "x"
            if not tail and nxt < n and documents_next(lines[nxt]) and scope_at[nxt]:
                out[i] = line[:indent] + "/**" + stripped[2:]
            last_trailing = None
            i = j + 1
            continue
        code, col, kind = info[i]
        last_trailing = None
        if col > 0 and code.strip() and not code.lstrip().startswith("#") and sc_ok_for_trailing(code, lines, i, scope_at):
            rest = line[col:]
            if kind == "//" and not rest.startswith("///") and not KEEP.match(rest):
                out[i] = line[:col] + "///<" + rest[2:]
                last_trailing = (i, col)
            elif kind == "/*" and not rest.startswith("/**") and rest.rstrip().endswith("*/") and rest.count("*/") == 1:
                out[i] = line[:col] + "/**<" + rest[2:]
        i += 1
    return "\n".join(x for x in out if x is not None)


def sc_ok_for_trailing(code, lines, i, scope_at):
    """A trailing comment documents the line's declaration when the line ends one (; or , or an enum's
    last value) and the next line is still in declaration scope (so the line did not open a body)."""
    c = code.rstrip()
    if not c:
        return False
    nxt_scope = scope_at[i + 1] if i + 1 < len(lines) else True
    if not nxt_scope:
        return False
    if c.endswith(";") or c.endswith(","):
        return True
    return bool(re.match(r"^\s*[A-Za-z_][A-Za-z_0-9]*(\s*=\s*[^;{}]+)?$", c))


def headers(root):
    """The tracked public headers (git ls-files: work in progress that is not tracked is left alone)."""
    out = subprocess.run(["git", "ls-files", "--", "*/include/hmmkit/*"], cwd=root, capture_output=True,
                         text=True, check=True).stdout.split()
    return [root / p for p in out]


def main(argv):
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    files = [Path(a) for a in args] if args else headers(root)
    changed = []
    for f in files:
        text = f.read_text()
        new = convert(text)
        if new != text:
            changed.append(str(f))
            if not check:
                f.write_text(new)
    for c in changed:
        print(("would change " if check else "changed ") + c)
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
