#include "moekit/error.h"

namespace moekit {

void fail(const std::string& op, const std::string& argument, const std::string& value,
          const std::string& what) {
  throw Error(op, argument, value, op + ": " + argument + "=" + value + " " + what);
}

}  // namespace moekit
