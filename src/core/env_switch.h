// Environment switches (MOEKIT_*): knobs for A/B measurement, each unset value meaning "the
// measured default". Callers read a switch once per process (a function-local static), never per
// call on a hot path; these readers only say how the text maps to a value.
#pragma once

#include <string>

namespace moekit::env {

// The variable's text; empty when it is unset.
std::string text(const char* name);

// Whether the variable is set to exactly `value`.
bool is(const char* name, const char* value);

// 1 when the variable is `yes`, 0 when it is `no`, -1 when it is unset or anything else.
int choice(const char* name, const char* yes = "1", const char* no = "0");

// The variable as a whole number (optional sign, decimal digits, nothing else); `fallback` when it
// is unset, empty or not such a number.
int integer(const char* name, int fallback);

}  // namespace moekit::env
