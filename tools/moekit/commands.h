// The moekit CLI's subcommands. Each returns the process exit code; errors in the user's input
// surface as moekit::Error (main prints one line and exits 2).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "moekit/backend.h"

namespace moekit::cli {

struct CheckOptions {
  std::optional<Backend> backend;  // none: every backend present except the reference
  std::optional<uint64_t> seed;    // none: a fresh seed, printed
  bool verbose = false;            // print each implementation choice and why others declined
  bool quick = false;              // decode token counts and 1024 only
};
int run_check(const CheckOptions& options);

struct BenchOptions {
  std::string op = "route";
  std::optional<Backend> backend;  // none: the fastest present
  int threads = 0;                 // CPU threads; 0 = all
  bool json = false;
  std::string model;   // empty: every model-table row
  int64_t tokens = 0;  // 0: every token count of the model table
};
int run_bench(const BenchOptions& options);

}  // namespace moekit::cli
