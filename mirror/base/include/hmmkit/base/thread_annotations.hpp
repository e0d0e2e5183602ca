/// @file
/// Clang thread-safety annotations. Under Clang with -Wthread-safety the compiler checks that every
/// GUARDED_BY field is touched with its lock held and that REQUIRES/EXCLUDES contracts hold; under
/// GCC the macros expand to nothing. The project's lock order is in docs/locking.md.
#pragma once

#if defined(__clang__)
#define HMMKIT_TSA(x) __attribute__((x))
#else
#define HMMKIT_TSA(x)
#endif

#define CAPABILITY(x) HMMKIT_TSA(capability(x))
#define SCOPED_CAPABILITY HMMKIT_TSA(scoped_lockable)
#define GUARDED_BY(x) HMMKIT_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) HMMKIT_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) HMMKIT_TSA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) HMMKIT_TSA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) HMMKIT_TSA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) HMMKIT_TSA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) HMMKIT_TSA(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) HMMKIT_TSA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) HMMKIT_TSA(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) HMMKIT_TSA(release_shared_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) HMMKIT_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) HMMKIT_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) HMMKIT_TSA(assert_capability(x))
#define RETURN_CAPABILITY(x) HMMKIT_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS HMMKIT_TSA(no_thread_safety_analysis)
