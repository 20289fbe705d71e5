// Which GPU routing kernel serves a problem, for tests and A/B timing. gpu::route picks v5 where it
// serves and pays (sigmoid: grouped rows at every batch size, ungrouped decode batches, Kimi-K2's
// 16 experts per lane up to 4096 tokens under OpOptions::static_weights), then v4 (grouped
// sigmoid in groups of 17-32 experts, long batches: where v5 is switched off), then v3 where it
// serves and is measured faster, then v2, then v1. Environment switches, read once per
// process: MOEKIT_GPU_ROUTE_V1=1 forces v1 for every call; MOEKIT_GPU_ROUTE_V4=0|1 and
// MOEKIT_GPU_ROUTE_V5=0|1 keep automatic calls off v4 / v5 or put them on it wherever it serves
// (_KEYS=exact: 64-bit keys only); MOEKIT_GPU_ROUTE_V3_OFF=1 turns v3, v4 and v5 off
// (v2 / v1 as before), MOEKIT_GPU_ROUTE_V3_OFF=grouped for grouped routing only;
// MOEKIT_GPU_ROUTE_V3_LANES=32|16|8|4 forces v3's lanes per row where that fits and
// MOEKIT_GPU_ROUTE_V3_SORT=full|top its sort, MOEKIT_GPU_ROUTE_V3_ROUNDS=vote|reduce the rounds of
// its sigmoid rows in whole warps, MOEKIT_GPU_ROUTE_V3_EARLY_TERMS=1|0 whether softmax by p starts
// its ordered denominator beside the sort; for measurement only, MOEKIT_GPU_ROUTE_V3_BLOCK_WARPS=
// 1|2 (smaller blocks) and MOEKIT_GPU_ROUTE_V3_DENOMINATOR=tree (a lane-tree denominator, not the
// reference's expert-order rounding); MOEKIT_GPU_ROUTE_V2_OFF=<list> (any of logit, prob,
// sigmoid, grouped, comma separated) turns v2 off for those cases only, and halfwarp in that list
// keeps v2 on one row per warp.
#pragma once

#include <string>

#include "gpu/route_gpu.h"
#include "ops/route_problem.h"

namespace moekit::gpu {

enum class RouteKernel {
  automatic,      // what gpu::route runs: v3, else v2 where they serve (and are not turned
                  // off), else v1
  v1,             // one warp per row, every valid call
  v2,             // specialized per scoring mode and experts per lane (E <= 512); rows of a
                  // whole warp, or of half a warp for long batches where that fits
  v2_whole_warp,  // v2 with one row per warp
  v2_half_warp,   // v2 with two rows per warp (E <= 256, K <= 32, whole-lane groups)
  v3,             // softmax without softcap and sigmoid, E <= 512 (grouped: E <= 256, groups of
                  // whole lanes, no softmax top2_sum): packed unique keys, sorted lanes; rows of
                  // 32 lanes, or fewer for long ungrouped batches
  v3_lanes32,     // v3 with one row per warp
  v3_lanes16,     // v3 with rows of 16, 8 or 4 lanes (16-bit logits, softmax, no bias,
  v3_lanes8,      //   E <= 16 per lane, K <= 2 per lane)
  v3_lanes4,
  // v3_lanes* lanes with 12 or 16 experts sort only their top few keys; these sort all of them
  // (the same kernels as v3_lanes* for fewer experts per lane).
  v3_full_sort_lanes32,
  v3_full_sort_lanes16,
  v3_full_sort_lanes8,
  v3_full_sort_lanes4,
  // v3_lanes32 whose sigmoid rounds reduce only the score and take the lowest holding lane by a
  // ballot (the same kernels as v3_lanes32 for other scorings).
  v3_vote_rounds,
  v4,  // grouped sigmoid, G <= 8, groups of <= 32 experts, Kr <= 8, K <= 16: two lanes per
       // group, 2 rows per warp
  v5,  // sigmoid, E <= 512, Kr <= 8, K <= 32, groups of whole lanes: one row per warp, 32-bit
       // keys first
  v6,  // softmax of 16-bit logits without bias or softcap, E <= 512, Kr <= 8 (10 for E > 256),
       // K <= 32, ungrouped or DeepSeek-V2's groups: one row per warp, unrolled rounds
};

// Empty when v2 can serve the problem, else why not (environment switches aside).
std::string route_v2_declines(const RouteProblem& problem);

// Empty when v3 can serve the problem, else why not (environment switches aside).
std::string route_v3_declines(const RouteProblem& problem);

// Empty when v4 can serve the problem, else why not (environment switches aside).
std::string route_v4_declines(const RouteProblem& problem);

// Empty when v5 can serve the problem, else why not (environment switches aside).
std::string route_v5_declines(const RouteProblem& problem);

// Empty when v6 can serve the problem, else why not (environment switches aside).
std::string route_v6_declines(const RouteProblem& problem);

// Whether v3 serves the problem with rows of `row_lanes` lanes (32, 16, 8 or 4).
bool route_v3_row_lanes_fit(const RouteProblem& problem, int row_lanes);

// Whether v2's two-rows-per-warp layout can serve the problem (given that v2 serves it).
bool route_v2_half_warp_fits(const RouteProblem& problem);

// Enqueues the given kernel (automatic: as gpu::route). Throws Error when a v2 kernel is asked
// for a problem it does not serve.
void route_with_kernel(const RouteProblem& problem, RouteKernel kernel);

}  // namespace moekit::gpu
