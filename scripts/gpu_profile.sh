#!/usr/bin/env bash
# Hardware-counter profiles of the kernels behind the speed goals, for tuning (not a benchmark):
#   scripts/gpu_profile.sh [CLI]     CLI defaults to build/gpu/moekit (built by gpu_check.sh)
# Runs Nsight Compute (ncu, clocks left alone) on one launch of each kernel of interest inside
# `moekit bench`, and prints per-kernel registers / shared memory. Everything goes to one file,
# $OUT/profile.txt (default /tmp/out). Where ncu cannot read the counters it says so and goes on.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
CLI=${1:-build/gpu/moekit}
LOG=$OUT/profile.txt
: > "$LOG"
if [[ ! -x $CLI ]]; then
  echo "no CLI at $CLI: run scripts/gpu_check.sh first" | tee -a "$LOG"
  exit 1
fi
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)

{
  echo "==== kernel resources (cuobjdump --dump-resource-usage)"
  cuobjdump --dump-resource-usage "$CLI" 2>/dev/null \
    | grep -E "Function|REG" | sed -E 's/^\s+//' | paste - - | cut -c1-220 | head -80
} >> "$LOG"

# name | ncu kernel filter | bench arguments
CASES=(
  "route Qwen3-30B 16384|regex:route_rows|--op route --model Qwen3-30B-A3B --tokens 16384"
  "route Qwen3.5 8192|regex:route_rows|--op route --model Qwen3.5-35B-A3B --tokens 8192"
  "route DeepSeek-V3 8192|regex:route_rows|--op route --model DeepSeek-V3 --tokens 8192"
  "route Qwen3-30B 1|regex:route_rows|--op route --model Qwen3-30B-A3B --tokens 1"
  "route Kimi-K2 16|regex:route_rows|--op route --model Kimi-K2 --tokens 16"
  "gemm swap M=1|regex:gemm_swap|--op gemm --model gate_up --tokens 1"
  "gemm swap M=64|regex:gemm_swap|--op gemm --model gate_up --tokens 64"
  "quant 16384x7168 row|regex:group_quant|--op quant --model row"
)
SECTIONS=(--section SpeedOfLight --section LaunchStats --section Occupancy
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis)
for case in "${CASES[@]}"; do
  IFS='|' read -r name filter args <<< "$case"
  echo "==== $name: ncu -k $filter, $CLI bench --backend gpu $args" >> "$LOG"
  if [[ -z $NCU ]]; then
    echo "no ncu on this machine" >> "$LOG"
    break
  fi
  REPORT=/tmp/gpu_profile_$$
  # shellcheck disable=SC2086
  if timeout 120 "$NCU" --clock-control none "${SECTIONS[@]}" -k "$filter" --launch-skip 3 \
    --launch-count 1 -f -o "$REPORT" "$CLI" bench --backend gpu $args > /dev/null 2>&1; then
    "$NCU" --import "$REPORT.ncu-rep" --page details 2>&1 | cut -c1-160 >> "$LOG"
  else
    echo "ncu failed or timed out (exit $?)" >> "$LOG"
  fi
  rm -f "$REPORT.ncu-rep"
done
echo "profiles: $LOG ($(wc -l < "$LOG") lines)"
