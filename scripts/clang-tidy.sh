#!/usr/bin/env bash
# Runs clang-tidy 14 with the checked-in .clang-tidy over every C/C++ source file that git tracks.
# Usage: scripts/clang-tidy.sh [BUILD_DIR]   (default: build/clang-tidy)
# Needs only a configured build directory (compile_commands.json): the project generates no headers,
# so nothing is built. Configures BUILD_DIR with the clang preset when it has no compile_commands.json.
# Exits nonzero when clang-tidy reports anything (.clang-tidy makes every warning an error).
# Environment: CLANG_TIDY (default clang-tidy-14), JOBS (default nproc).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build_dir=${1:-build/clang-tidy}
tidy=${CLANG_TIDY:-clang-tidy-14}
jobs=${JOBS:-$(nproc)}

if ! command -v "$tidy" >/dev/null; then
  echo "clang-tidy.sh: $tidy not found (set CLANG_TIDY)" >&2
  exit 2
fi
if [[ ! -f "$build_dir/compile_commands.json" ]]; then
  # CMakeLists.txt sets CMAKE_EXPORT_COMPILE_COMMANDS; passing it again keeps this script correct if
  # that line moves to a preset.
  cmake --preset clang -B "$build_dir" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
fi

# Every tracked .c/.cpp outside build/ that the compilation database knows (a file in no target,
# such as a fuzz harness built only by its own lane, has no flags to check it with).
mapfile -t files < <(git ls-files -- '*.c' '*.cpp' ':!:build/**')
mapfile -t known < <(python3 - "$build_dir/compile_commands.json" "${files[@]}" <<'PY'
import json, os, sys
db = {os.path.realpath(e["file"]) for e in json.load(open(sys.argv[1]))}
for f in sys.argv[2:]:
    if os.path.realpath(f) in db:
        print(f)
    else:
        print(f"clang-tidy.sh: skipped (not in compile_commands.json): {f}", file=sys.stderr)
PY
)
if [[ ${#known[@]} -eq 0 ]]; then
  echo "clang-tidy.sh: no source files in $build_dir/compile_commands.json" >&2
  exit 2
fi

start=$(date +%s)
status=0
# One clang-tidy per file, $jobs at a time; xargs exits 123 when any of them failed.
printf '%s\0' "${known[@]}" |
  xargs -0 -P "$jobs" -n 1 "$tidy" -p "$build_dir" --quiet 2> >(grep -v ' warnings\? generated\.$' >&2) ||
  status=$?
echo "clang-tidy.sh: ${#known[@]} files in $(($(date +%s) - start)) s, $( ((status == 0)) && echo clean || echo 'findings above')" >&2
exit $((status == 0 ? 0 : 1))
