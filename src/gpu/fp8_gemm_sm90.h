// Extras of the Hopper FP8 GEMM (fp8_gemm_sm90.cu) for tests and benchmarks; the op entry points
// are in fp8_gpu.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ops/fp8_problem.h"

namespace moekit::gpu {

// The launch the kernel would make for the problem, in words ("swap: 8 tokens x 64 weight rows
// per CTA, K split 2 ways ..."). Only for a problem block_gemm_sm90_supports() accepts.
std::string block_gemm_sm90_plan(const BlockGemmProblem& problem);
// The fused linear layer's launch, in words (w8a8_linear_sm90_fused_supports must accept it).
std::string w8a8_linear_sm90_fused_plan(const W8a8LinearProblem& problem);

// ---- Phase stamps of the swap kernel, for timing diagnosis only: recorded in builds configured
// with -DMOEKIT_FP8_TRACE=ON (compile definition MOEKIT_FP8_TRACE; off by default, and then the
// kernels hold none of it). One record per CTA per call, written by its thread 0 as it leaves.
enum class Sm90TracePhase : int {
  entry,                 // thread 0's first instruction
  producer_waited,       // the producer thread's griddepcontrol.wait returned
  consumer_waited,       // thread 0's (consumers') griddepcontrol.wait returned
  first_weights_landed,  // stage 0's weight tile seen in shared memory (early weight loads only)
  scales_staged,         // the consumers' scales are in shared memory (barrier before the loop)
  first_stage_full,      // thread 0's first k-block (weight and token tile) complete
  last_issued,           // the producer issued its last tile
  last_consumed,         // the last k-block multiplied and promoted (its warpgroup's thread 0)
  sums_done,             // rank 0: the warpgroups' and ranks' sums added; others: theirs sent
  stores_issued,         // rank 0: thread 0's epilogue stores issued
  exit,                  // thread 0 done (rank 0: after the last cluster barrier, if any)
  count
};
inline constexpr int kSm90TracePhases = static_cast<int>(Sm90TracePhase::count);
// The tiles kernel's records (entry and exit stamped as above) keep ring-wait cycle counts in two
// of these slots, time_ns 1 where written: consumer thread 0's waits for full stages, and the
// producer thread's waits for empty ones. Consumer thread 0 also stamps last_consumed (its loop
// done), sums_done (the tile staged for the stores) and stores_issued.
inline constexpr Sm90TracePhase kTilesFullWaits = Sm90TracePhase::first_stage_full;
inline constexpr Sm90TracePhase kTilesEmptyWaits = Sm90TracePhase::last_issued;
// The persistent wide kernel's build that splits its last round (a workspace given) stamps, by
// consumer thread 0, entry, consumer_waited, stores_issued (its last split-round tile's) and exit
// as above, and its split round's steps in these slots; its other builds record nothing.
namespace persistent_trace {
inline constexpr Sm90TracePhase whole_done = Sm90TracePhase::first_weights_landed;  // whole units
inline constexpr Sm90TracePhase partial_multiplied = Sm90TracePhase::scales_staged;
inline constexpr Sm90TracePhase partial_saved = Sm90TracePhase::first_stage_full;  // stores issued
inline constexpr Sm90TracePhase final_multiplied = Sm90TracePhase::last_issued;
inline constexpr Sm90TracePhase partial_published = Sm90TracePhase::producer_waited;  // flag set
inline constexpr Sm90TracePhase partners_ready = Sm90TracePhase::last_consumed;  // last flag seen
inline constexpr Sm90TracePhase partials_added = Sm90TracePhase::sums_done;
}  // namespace persistent_trace

struct Sm90TraceRecord {
  uint64_t time_ns[kSm90TracePhases];  // %globaltimer (device-wide), 0: phase not reached
  uint64_t cycles[kSm90TracePhases];   // the SM's cycle counter at the same points
  uint32_t ticket;                     // order of entry since the last reset, over all calls
  uint32_t grid_ctas;                  // CTAs of this call's grid (ticket / grid_ctas: the call)
  uint32_t block_x, block_y, rank, sm;
};

// Whether this build records stamps (MOEKIT_FP8_TRACE).
bool block_gemm_sm90_trace_built();
// Clears the records and the ticket counter (synchronizes the device).
void block_gemm_sm90_trace_reset();
// The records written since the last reset, by ticket (synchronizes the device); at most
// block_gemm_sm90_trace_capacity() records are kept, later CTAs are dropped.
std::vector<Sm90TraceRecord> block_gemm_sm90_trace_read();
int block_gemm_sm90_trace_capacity();

}  // namespace moekit::gpu
