#pragma once
#include "ops/route_problem.h"

namespace moekit::reference {
// The definitional routing math of spec/routing.md, scalar and plain: the oracle for every backend.
// Serves any valid problem on the CPU, with any strides.
void route(const RouteProblem& problem);
}  // namespace moekit::reference

namespace moekit::reference {
// The selection score of every expert of one row (step 1 of the contract, NaN mapped to -inf):
// what the tie-aware comparison of ids uses to decide whether two candidates are a near-tie.
void selection_scores(const RouteProblem& problem, int64_t row, float* scores);
}  // namespace moekit::reference
