// GPU routing (CUDA dialect; builds for MUSA and HIP through src/gpu/vendors/). Only declared here
// so that plain C++ front ends can list it in the dispatch table.
#pragma once

#include <string>

#include "ops/route_problem.h"

namespace moekit::gpu {

std::string route_supports(const RouteProblem& problem);
// Enqueues on problem.stream: no host synchronization, no allocation, no copies (graph-capturable).
void route(const RouteProblem& problem);
// The kernel route() runs for this problem, in words ("v3 softmax by logit, 4 experts per lane,
// rows of 8 lanes, ..." or "v1 (why v2 and v3 do not serve)"): `moekit explain` prints it.
std::string route_kernel_name(const RouteProblem& problem);

}  // namespace moekit::gpu
