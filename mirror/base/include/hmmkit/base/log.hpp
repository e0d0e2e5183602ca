/// @file
/// Logging. One spdlog logger named "hmmkit"; its level comes from HMMKIT_LOG
/// (trace, debug, info, warn, error, off; default warn) the first time Log() is called.
/// Hot paths (fault, migration, TLB lookup) log at debug or below only.
#pragma once

#include <spdlog/spdlog.h>

namespace hmmkit {

/// The process-wide hmmkit logger. Thread-safe; never null.
spdlog::logger& Log();

}  // namespace hmmkit
