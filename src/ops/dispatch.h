// The one dispatch mechanism every op front end uses: a table of implementations, fastest first,
// each with a supports() that returns "" when it serves a problem and otherwise the reason it
// declines. A requested backend's entries only are eligible; with none requested, every entry of
// a backend that runs on the tensors' device is, so the CPU kernels serve and the reference
// catches what they decline.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "moekit/backend.h"
#include "moekit/error.h"
#include "moekit/tensor.h"

namespace moekit {

template <class Problem>
struct Implementation {
  const char* name;
  Backend backend;
  std::string (*supports)(const Problem& problem);
  void (*run)(const Problem& problem);
  // Optional: how run() will serve the problem, in words (the kernel and its layout), for explain.
  std::string (*describe)(const Problem& problem) = nullptr;
};

// "" when the entry may be considered for a call on `device` with these options.
inline std::string eligibility(const char* name, Backend backend, Device device,
                               const OpOptions& options) {
  if (!options.implementation.empty() && options.implementation != name)
    return "implementation " + options.implementation + " was requested";
  if (options.backend) {
    if (backend != *options.backend)
      return "backend " + std::string(backend_name(*options.backend)) + " was requested";
  } else if ((backend == Backend::gpu) != device.is_gpu()) {
    return "tensors are on " + device.str();
  }
  if (!backend_available(backend)) return "backend not present on this machine";
  return "";
}

// Every entry with its verdict: the first that serves is chosen; a later one that would serve too
// keeps an empty reason.
template <class Problem>
std::vector<ImplementationChoice> explain_table(std::span<const Implementation<Problem>> table,
                                                const Problem& problem, Device device,
                                                const OpOptions& options) {
  std::vector<ImplementationChoice> rows;
  bool chosen = false;
  for (const Implementation<Problem>& impl : table) {
    ImplementationChoice row{
        impl.name, impl.backend, false, eligibility(impl.name, impl.backend, device, options), {}};
    if (row.reason.empty()) row.reason = impl.supports(problem);
    if (row.reason.empty() && !chosen) {
      row.chosen = chosen = true;
      if (impl.describe != nullptr) row.detail = impl.describe(problem);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// Runs the first eligible entry that serves the problem (nothing when `empty`); throws Error
// naming the backend and every entry's reason when none serves.
template <class Problem>
void dispatch(const char* op, std::span<const Implementation<Problem>> table,
              const Problem& problem, Device device, const OpOptions& options, bool empty) {
  const Backend requested = options.backend   ? *options.backend
                            : device.is_gpu() ? Backend::gpu
                                              : Backend::cpu;
  if (!backend_available(requested))
    fail(op, "backend", std::string(backend_name(requested)), "is not present on this machine");
  std::string reasons;
  for (const Implementation<Problem>& impl : table) {
    if (!eligibility(impl.name, impl.backend, device, options).empty()) continue;
    const std::string why_not = impl.supports(problem);
    if (why_not.empty()) {
      if (!empty) impl.run(problem);
      return;
    }
    reasons += std::string(reasons.empty() ? "" : "; ") + impl.name + ": " + why_not;
  }
  if (!options.implementation.empty() && reasons.empty())
    fail(op, "implementation", options.implementation, "is not an entry of this op's table");
  fail(op, "backend",
       options.backend ? std::string(backend_name(*options.backend)) : "any on " + device.str(),
       "cannot serve this call (" + reasons + ")");
}

}  // namespace moekit
