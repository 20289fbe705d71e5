// CPU routing kernels: threads over tokens, SIMD per row, no allocation per call. One build per
// ISA (scalar, AVX2, AVX-512), picked at run time by route's dispatch table.
#pragma once

#include <string>

#include "ops/route_problem.h"

namespace moekit::cpu {

// Each supports_* returns "" when it serves the problem, else the reason it declines.
std::string route_supports_avx512(const RouteProblem& problem);
void route_avx512(const RouteProblem& problem);
std::string route_supports_avx2(const RouteProblem& problem);
void route_avx2(const RouteProblem& problem);
std::string route_supports_scalar(const RouteProblem& problem);
void route_scalar(const RouteProblem& problem);

}  // namespace moekit::cpu
