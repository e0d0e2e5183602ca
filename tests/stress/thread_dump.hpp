// What every thread of a hung process is doing, for the watchdog's hang report.
#pragma once

namespace stress {

// Lets a debugger started by DumpThreads attach to this process even where Yama restricts ptrace
// to descendants. Call once at start-up, before any hang can happen.
void AllowThreadDump();

// Writes to stderr, for every thread of this process: its id, name, kernel wait channel and
// current system call (from /proc), then, where gdb is on PATH, a backtrace of every thread
// (gdb -batch, bounded to 60 s). Called from the watchdog thread while the others may hold any
// lock; it takes none of ours and allocates only in this thread.
void DumpThreads();

}  // namespace stress
