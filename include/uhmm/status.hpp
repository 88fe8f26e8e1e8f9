// uhmm/status.hpp: the one error vocabulary.
//
// Errors are errno values with the kernel's meanings (EINVAL bad argument,
// EBUSY try again / in use, EFAULT no usable mapping, ENOMEM out of memory,
// EPERM not permitted, ENOENT nothing there, EIO device failure).  Nothing in
// uhmm throws across a thread boundary or through a callback; functions that
// can fail return Status or Result<T>.
#pragma once

#include <cerrno>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace uhmm {

class [[nodiscard]] Status {
 public:
  Status() = default;  // success
  static Status ok() { return {}; }
  static Status error(int code, std::string message = {}) { return Status(code, std::move(message)); }

  bool is_ok() const { return code_ == 0; }
  explicit operator bool() const { return is_ok(); }
  /// errno value; 0 on success.
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  /// "EBUSY: page map has 3 pages in use" style text.
  std::string to_string() const;

  friend bool operator==(const Status& a, const Status& b) { return a.code_ == b.code_; }

 private:
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}
  int code_ = 0;
  std::string message_;
};

/// Symbolic name of an errno value ("EINVAL"), or the number.
std::string errno_name(int code);

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {
    if (std::get<Status>(v_).is_ok()) v_ = Status::error(EINVAL, "Result built from an ok Status");
  }

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  T& value() & { return checked(); }
  const T& value() const& { return const_cast<Result*>(this)->checked(); }
  T&& value() && { return std::move(checked()); }
  T* operator->() { return &checked(); }
  T& operator*() { return checked(); }
  Status status() const { return is_ok() ? Status::ok() : std::get<Status>(v_); }
  int code() const { return is_ok() ? 0 : std::get<Status>(v_).code(); }

 private:
  T& checked() {
    if (!is_ok()) std::abort();  // using a failed Result's value is a programming error
    return std::get<T>(v_);
  }
  std::variant<T, Status> v_;
};

}  // namespace uhmm

/// Propagate a failed Status from an expression.
#define UHMM_TRY(expr)                         \
  do {                                         \
    ::uhmm::Status uhmm_try_status_ = (expr);  \
    if (!uhmm_try_status_.is_ok()) return uhmm_try_status_; \
  } while (0)
