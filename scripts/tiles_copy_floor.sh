#!/usr/bin/env bash
# The Hopper tiles kernel taken apart (docs/perf/fp8-gpu-sm90.md, sessions 17 and 18). Needs a
# diagnosis build (cmake -DMOEKIT_FP8_TRACE=ON), which reads MOEKIT_SM90_TILES_ABLATE: 1 the copies
# alone, 6 the tensor work alone (no copies), 7 the whole kernel without the promotion, 8 without
# the scale copies; and, with pairs of CTAs off (5 has no multicast), 4 the copies alone without
# the scales against 5, the same with two k-blocks per copy.
#   scripts/tiles_copy_floor.sh [--rounds N]      builds build/trace if TRACE_BIN is not set
#   TRACE_BIN=path/to/moekit scripts/tiles_copy_floor.sh
# Prints scripts/bench_ab.py's table per shape (us per call; the ablated rows are NOT VERIFIED by
# design: their outputs are wrong). Tiles of 128 rows throughout (MOEKIT_SM90_TILES_ROWS=128): the
# persistent wide kernel takes no ablation.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=2
if [[ ${1:-} == --rounds ]]; then ROUNDS=${2:?--rounds needs a count}; fi
DEPS=$ROOT/build-deps/usr
BIN=${TRACE_BIN:-}
if [[ -z $BIN ]]; then
  BUILD=$ROOT/build/trace
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  PREFIX=()
  [[ -d $DEPS ]] && PREFIX=(-DCMAKE_PREFIX_PATH="$DEPS")
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_FP8_TRACE=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a-real -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "${PREFIX[@]}" > /dev/null
  ninja -C "$BUILD" moekit_cli > /dev/null
  BIN=$BUILD/moekit
fi
[[ -x $BIN ]] || { echo "tiles_copy_floor.sh: no moekit at $BIN" >&2; exit 2; }
[[ -d $DEPS ]] && export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

export MOEKIT_SM90_TILES_ROWS=128
VARIANTS=(--variant whole="" --variant copies="MOEKIT_SM90_TILES_ABLATE=1"
  --variant no_copies="MOEKIT_SM90_TILES_ABLATE=6" --variant no_promotion="MOEKIT_SM90_TILES_ABLATE=7"
  --variant no_scale_copies="MOEKIT_SM90_TILES_ABLATE=8"
  --variant no_scales_unpaired="MOEKIT_SM90_TILES_ABLATE=4 MOEKIT_SM90_TILES_PAIR=0"
  --variant k_pairs_unpaired="MOEKIT_SM90_TILES_ABLATE=5 MOEKIT_SM90_TILES_PAIR=0")
status=0
for shape in "N=7168 K=16384:4096" "N=4096 K=7168:1024" "N=4096 K=7168:256" "N=7168 K=2048:256"; do
  python3 scripts/bench_ab.py --rounds "$ROUNDS" --bin "$BIN" "${VARIANTS[@]}" -- \
    bench --op gemm --backend gpu --model "${shape%%:*}" --tokens "${shape##*:}" |
    grep -A7 "| gpu.sm90\|^failed" || status=1
done
exit $status
