#include "core/env_switch.h"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace moekit::env {

std::string text(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::string(value) : std::string();
}

bool is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

int choice(const char* name, const char* yes, const char* no) {
  if (is(name, yes)) return 1;
  if (is(name, no)) return 0;
  return -1;
}

int integer(const char* name, int fallback) {
  const char* set = std::getenv(name);
  if (set == nullptr || *set == '\0') return fallback;
  errno = 0;
  char* end = nullptr;
  const long value = std::strtol(set, &end, 10);
  if (errno != 0 || *end != '\0' || value < INT_MIN || value > INT_MAX) return fallback;
  return static_cast<int>(value);
}

}  // namespace moekit::env
