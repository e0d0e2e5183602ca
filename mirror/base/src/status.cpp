#include "hmmkit/base/status.hpp"

#include <cstring>

namespace hmmkit {

Status Status::FromErrno(int err, std::string_view message) {
  Status s;
  s.ec_ = std::error_code(err > 0 ? err : EIO, std::generic_category());
  if (!message.empty()) s.msg_ = std::make_shared<const std::string>(message);
  return s;
}

std::string Status::message() const {
  if (ok()) return "ok";
  if (msg_) return *msg_;
  return ec_.message();
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  const char* name = strerrorname_np(ec_.value());
  std::string out = name ? name : std::to_string(ec_.value());
  out += ": ";
  out += message();
  return out;
}

}  // namespace hmmkit
