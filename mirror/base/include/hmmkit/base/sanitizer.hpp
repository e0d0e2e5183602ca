/// @file
/// Which sanitizer this translation unit is built with, detected once for GCC (__SANITIZE_*__) and
/// Clang (__has_feature). hmmkit adapts where a sanitizer's runtime shares the address space with
/// the application: its heap is a fixed region, and its mappings merge with the application's.
#pragma once

#if defined(__has_feature)
#define HMMKIT_HAS_FEATURE(x) __has_feature(x)
#else
#define HMMKIT_HAS_FEATURE(x) 0
#endif

namespace hmmkit {

#if defined(__SANITIZE_ADDRESS__) || HMMKIT_HAS_FEATURE(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif

#if defined(__SANITIZE_THREAD__) || HMMKIT_HAS_FEATURE(thread_sanitizer)
inline constexpr bool kThreadSanitizer = true;
#else
inline constexpr bool kThreadSanitizer = false;
#endif

inline constexpr bool kUnderSanitizer = kAddressSanitizer || kThreadSanitizer;

}  // namespace hmmkit
