#include "hmmkit/base/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <memory>

namespace hmmkit {

namespace {
std::shared_ptr<spdlog::logger> MakeLogger() {
  auto logger = std::make_shared<spdlog::logger>(
      "hmmkit", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  logger->set_pattern("[hmmkit %L %t] %v");
  spdlog::level::level_enum level = spdlog::level::warn;
  if (const char* env = std::getenv("HMMKIT_LOG"); env && *env) {
    level = spdlog::level::from_str(env);  // unknown names map to "off" in spdlog: say so
    if (level == spdlog::level::off && std::string_view(env) != "off") {
      level = spdlog::level::warn;
      logger->set_level(level);
      logger->warn("HMMKIT_LOG='{}' is not a level (trace, debug, info, warn, error, off)", env);
    }
  }
  logger->set_level(level);
  return logger;
}
}  // namespace

spdlog::logger& Log() {
  static std::shared_ptr<spdlog::logger> logger = MakeLogger();
  return *logger;
}

}  // namespace hmmkit
