/// @file
/// The one error type of hmmkit's C++ API.
///
/// Status carries a std::error_code in the generic (errno) category plus an optional message naming
/// the address and the reason. Result<T> is a value or a Status. Both are [[nodiscard]]: an error
/// cannot be dropped silently. Success never allocates; a message is built only on the error path.
///
/// Errno values follow the kernel's conventions so that driver authors read them the same way:
///   EBUSY   the notifier sequence moved; retry (the retry-loop helper does this for you)
///   EFAULT  no VMA, or a PROT_NONE VMA, under a range that had to be faulted
///   EPERM   write requested on a read-only mapping
///   EINVAL  bad arguments (unaligned, empty, overflowing range)
///   ENOMEM  an allocation failed
///   ENOTSUP a kernel feature the call needs is missing (the message names it)
///   ETIMEDOUT a retry loop ran out of time
#pragma once

#include <cerrno>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>

namespace hmmkit {

class [[nodiscard]] Status {
 public:
  Status() = default;  ///< success
  static Status Ok() { return Status(); }
  /// err is a positive errno value.
  static Status FromErrno(int err, std::string_view message = {});

  bool ok() const { return !ec_; }
  explicit operator bool() const { return ok(); }
  const std::error_code& code() const { return ec_; }
  int errno_value() const { return ec_.value(); }
  /// The message given at creation, or the errno text when none was given.
  std::string message() const;
  /// "EFAULT: <message>" — for logs and test failures.
  std::string ToString() const;
  /// Marks a status as deliberately ignored.
  void IgnoreError() const {}

 private:
  std::error_code ec_;
  std::shared_ptr<const std::string> msg_;  ///< null on success and when no message was given
};

/// A value or an error. Accessing value() of an error Result is a bug and aborts.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) std::abort();   // a Result error must carry an error
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return ok(); }
  const T& value() const& { return ok() ? std::get<T>(v_) : (std::abort(), std::get<T>(v_)); }
  T& value() & { return ok() ? std::get<T>(v_) : (std::abort(), std::get<T>(v_)); }
  T&& value() && {
    return ok() ? std::get<T>(std::move(v_)) : (std::abort(), std::get<T>(std::move(v_)));
  }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }
  int errno_value() const { return ok() ? 0 : std::get<Status>(v_).errno_value(); }

 private:
  std::variant<T, Status> v_;
};

/// Returns from the enclosing function when expr is an error Status.
#define HMMKIT_RETURN_IF_ERROR(expr)         \
  do {                                       \
    ::hmmkit::Status hmmkit_st_ = (expr);    \
    if (!hmmkit_st_.ok()) return hmmkit_st_; \
  } while (0)

}  // namespace hmmkit
