#!/usr/bin/env bash
# Builds hmmkit's API reference (docs/Doxyfile) into OUTDIR/html and fails on any Doxygen warning.
# Usage: scripts/doxygen.sh [OUTDIR]   (default build/doxygen)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-build/doxygen}
mkdir -p "$out"
out=$(cd "$out" && pwd)

command -v doxygen >/dev/null || { echo "doxygen.sh: doxygen is not installed (scripts/install-deps.sh)" >&2; exit 1; }

log="$out/warnings.log"
rc=0
(cd "$root" && HMMKIT_DOXYGEN_OUT="$out" doxygen docs/Doxyfile) >"$log" 2>&1 || rc=$?
# FAIL_ON_WARNINGS already fails the run; also fail when anything at all was printed (QUIET is on).
if [ "$rc" -ne 0 ] || [ -s "$log" ]; then
  cat "$log" >&2
  echo "doxygen.sh: $(grep -cE 'warning:|error:' "$log" || true) warning(s), doxygen exit $rc: fix the comments named above" >&2
  exit 1
fi
echo "doxygen.sh: API reference in $out/html/index.html, no warnings"
