// moekit::Error: the one exception type the library throws. It names the op, the argument and the
// offending value so a caller can act on it without reading our code.
#pragma once

#include <stdexcept>
#include <string>

namespace moekit {

class Error : public std::runtime_error {
 public:
  // message is the full sentence shown to users, e.g. "route: topk=9 exceeds num_experts=8".
  Error(std::string op, std::string argument, std::string value, const std::string& message)
      : std::runtime_error(message),
        op_(std::move(op)),
        argument_(std::move(argument)),
        value_(std::move(value)) {}

  const std::string& op() const { return op_; }
  const std::string& argument() const { return argument_; }
  const std::string& value() const { return value_; }

 private:
  std::string op_, argument_, value_;
};

// Throws Error(op, argument, value, "op: argument=value <what>").
[[noreturn]] void fail(const std::string& op, const std::string& argument, const std::string& value,
                       const std::string& what);

}  // namespace moekit
