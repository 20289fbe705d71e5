// Which GPU routing kernel serves a problem, for tests and A/B timing. gpu::route picks v2 where it
// serves and v1 everywhere else; MOEKIT_GPU_ROUTE_V1=1 forces v1 for every call, and
// MOEKIT_GPU_ROUTE_V2_OFF=<list> (any of logit, prob, sigmoid, grouped, comma separated) turns v2
// off for those cases only, and halfwarp in that list keeps v2 on one row per warp. Both are read
// once per process.
#pragma once

#include <string>

#include "ops/route_problem.h"

namespace moekit::gpu {

enum class RouteKernel {
  automatic,      // what gpu::route runs: v2 where it serves (and is not turned off), else v1
  v1,             // one warp per row, every valid call
  v2,             // specialized per scoring mode and experts per lane (E <= 512); rows of a
                  // whole warp, or of half a warp for long batches where that fits
  v2_whole_warp,  // v2 with one row per warp
  v2_half_warp,   // v2 with two rows per warp (E <= 256, K <= 32, whole-lane groups)
};

// Empty when v2 can serve the problem, else why not (environment switches aside).
std::string route_v2_declines(const RouteProblem& problem);

// The kernel gpu::route runs for this problem, in words ("v2 sigmoid, 8 experts per lane, 1 row
// per warp, grouped" or "v1 (why v2 does not serve)").
std::string route_kernel_name(const RouteProblem& problem);

// Whether v2's two-rows-per-warp layout can serve the problem (given that v2 serves it).
bool route_v2_half_warp_fits(const RouteProblem& problem);

// Enqueues the given kernel (automatic: as gpu::route). Throws Error when a v2 kernel is asked
// for a problem it does not serve.
void route_with_kernel(const RouteProblem& problem, RouteKernel kernel);

}  // namespace moekit::gpu
