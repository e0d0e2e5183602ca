#!/usr/bin/env bash
# hang-report.sh SECONDS PROGRAM [ARGS...]: runs PROGRAM; if it is still running after SECONDS,
# prints where each of its threads waits (/proc: name, kernel wait channel, system call) and gdb's
# backtraces of every thread (where gdb is installed), then kills it and exits 124.
# Otherwise exits with PROGRAM's status. ctest's own timeout kills without a word: give SECONDS
# below the test's TIMEOUT so that a rare hang in CI can be diagnosed from the log alone.
set -u
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: hang-report.sh SECONDS PROGRAM [ARGS...]" >&2
  exit 2
fi
limit=$1
shift
"$@" &
pid=$!
# Poll in short steps so a quick program returns quickly; bash's wait cannot time out.
for ((tenths = 0; tenths < limit * 10; tenths++)); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
  echo "hang-report: $1 still running after ${limit} s: a hang" >&2
  echo "threads (/proc/$pid/task: tid name wchan syscall):" >&2
  for task in /proc/"$pid"/task/*; do
    echo "  ${task##*/} $(cat "$task/comm" 2>/dev/null) $(cat "$task/wchan" 2>/dev/null)" \
      "[$(cat "$task/syscall" 2>/dev/null)]" >&2
  done
  if command -v gdb >/dev/null; then
    echo "backtraces (gdb):" >&2
    timeout -s KILL 60 gdb -batch -nx -p "$pid" -ex "thread apply all bt 32" 2>&1 |
      grep -E '^(Thread |#)' >&2
  else
    echo "no gdb on PATH: no backtraces" >&2
  fi
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  exit 124
fi
wait "$pid"
