#!/usr/bin/env bash
# The one script for the GPU machine, run from anywhere in the repo:
#   scripts/gpu_check.sh [--quick]     build (Release, sm_90a), GPU tests, `moekit check` and
#                                      `moekit bench` on the GPU, the peer benchmark, a summary
#   GPU_CHECK_PREBUILT=1 scripts/gpu_check.sh [--quick]   the same with build/gpu/moekit,
#                                      build/gpu/moekit_gpu_tests, build/gpu/hbm_stream_floor (and wgmma_rate)
#                                      built on a dev machine and carried (with build-deps for
#                                      their shared libraries): no build here
#   scripts/gpu_check.sh --pack-deps   (on a dev machine) copy gtest, fmt, CLI11 and nlohmann-json
#                                      from /usr into build-deps/ (git-ignored), a CMake prefix the
#                                      GPU machine uses when it lacks them: carry build-deps there.
# Everything useful lands in $OUT (default /tmp/out): gpu_check.log and summary.txt, and the other
# outputs (tests.txt, bench_gpu.json, peers.txt, the A/B tables and JSON, fp8_*) packed into
# gpu_check_files.tgz at the end (the device tool returns at most 8 files). Each step has a time
# limit. The GPU tests took ~410 s on an H200 in session 25 as one process; they now run as
# gtest shards side by side (GPU_CHECK_TEST_SHARDS, default 4). GPU_CHECK_TESTS_FILTER (a gtest
# filter, default every test but the Prints* diagnostics) narrows them.
# A step that cannot run says why and the script goes on with what it can do.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
BUILD=$ROOT/build/gpu
DEPS=$ROOT/build-deps/usr

if [[ ${1:-} == --pack-deps ]]; then
  rm -rf "$ROOT/build-deps" && mkdir -p "$DEPS/include" "$DEPS/lib/x86_64-linux-gnu/cmake" \
    "$DEPS/share/cmake"
  for d in gtest gmock fmt nlohmann CLI; do cp -r "/usr/include/$d" "$DEPS/include/"; done
  cp -P /usr/lib/x86_64-linux-gnu/libgtest*.a /usr/lib/x86_64-linux-gnu/libgmock*.a \
    /usr/lib/x86_64-linux-gnu/libfmt.so* "$DEPS/lib/x86_64-linux-gnu/"
  cp -r /usr/lib/x86_64-linux-gnu/cmake/GTest /usr/lib/x86_64-linux-gnu/cmake/fmt \
    "$DEPS/lib/x86_64-linux-gnu/cmake/"
  cp -r /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json "$DEPS/share/cmake/"
  du -sh "$ROOT/build-deps"
  echo "packed: pass carry [\"build-deps\"] to the GPU machine's run"
  exit 0
fi
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1

exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
step() { echo; echo "==== $* ($(($(date +%s) - START)) s)"; }
SUMMARY=()
note() { SUMMARY+=("$*"); echo ">>> $*"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || note "no nvidia-smi"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" --version | tail -2
for tool in cmake ninja g++ python3; do
  printf '%-8s %s\n' "$tool" "$(command -v $tool || echo MISSING)"
done
cmake --version 2>/dev/null | head -1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  2>/dev/null || echo "torch/triton: not importable"

step "configure and build (Release, sm_90a)"
BUILT=0
if [[ ${GPU_CHECK_PREBUILT:-0} == 1 && -x $BUILD/moekit && -x $BUILD/moekit_gpu_tests ]]; then
  # Binaries built on a dev machine (same CMake options) and carried: no build time here.
  export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  BUILT=1
  note "using the carried binaries in $BUILD (GPU_CHECK_PREBUILT=1): not built here"
elif ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  note "build skipped: cmake or ninja missing"
else
  PREFIX=()
  if [[ -d $DEPS ]]; then
    PREFIX=(-DCMAKE_PREFIX_PATH="$DEPS")
    echo "using carried dependencies in $DEPS"
  fi
  configure() {
    cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES=90a-real -DCMAKE_CUDA_COMPILER="$NVCC" \
      -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "${PREFIX[@]}" "$@" > "$OUT/configure.txt" 2>&1
  }
  TARGETS=(moekit_gpu_tests moekit_cli hbm_stream_floor wgmma_rate)
  if configure -DMOEKIT_BUILD_TESTS=ON; then
    :
  elif rm -rf "$BUILD" && configure -DMOEKIT_BUILD_TESTS=OFF; then
    note "configured WITHOUT tests (GoogleTest not found): no moekit_gpu_tests"
    TARGETS=(moekit_cli hbm_stream_floor wgmma_rate)
  else
    tail -30 "$OUT/configure.txt"
    note "configure failed (missing fmt / CLI11 / nlohmann-json / GoogleTest? run" \
      "'scripts/gpu_check.sh --pack-deps' on a dev machine and carry build-deps)"
    TARGETS=()
  fi
  if ((${#TARGETS[@]})); then
    if timeout 420 ninja -C "$BUILD" -j"$(nproc)" "${TARGETS[@]}" > "$OUT/build.txt" 2>&1; then
      BUILT=1
      rm -f "$OUT/build.txt"
      note "build ok (${TARGETS[*]})"
    else
      grep -E "error|FAILED" "$OUT/build.txt" | head -30
      note "build FAILED (build.txt)"
    fi
  fi
  if ((!BUILT)); then
    # At least show whether the GPU sources compile here.
    for f in src/gpu/gpu_runtime.cu src/gpu/route_gpu.cu; do
      if timeout 240 "$NVCC" -std=c++20 -O3 -arch=sm_90a -Iinclude -Isrc --expt-relaxed-constexpr \
        -c "$f" -o /dev/null; then
        note "compile-only check ok: $f"
      else
        note "compile-only check FAILED: $f"
      fi
    done
  fi
fi
rm -f "$OUT/configure.txt"

CLI=$BUILD/moekit
TESTS=$BUILD/moekit_gpu_tests

step "GPU tests"
if [[ -x $TESTS ]]; then
  # The Sm90BlockFp8Gemm.Prints* diagnostics (timings and trace tables, read by hand with their
  # knobs) assert little and took the suite past its limit in session 20: run them on their own.
  # The suite runs as GPU_CHECK_TEST_SHARDS gtest shards at once (default 4): most of its time is
  # the reference on the host (each sm90 test computes it on cores / 4 threads), which the shards
  # spread over the cores.
  SHARDS=${GPU_CHECK_TEST_SHARDS:-4}
  PIDS=()
  for ((i = 0; i < SHARDS; ++i)); do
    GTEST_TOTAL_SHARDS=$SHARDS GTEST_SHARD_INDEX=$i timeout 420 "$TESTS" \
      --gtest_filter="${GPU_CHECK_TESTS_FILTER:--*.Prints*}" > "$OUT/tests_$i.txt" 2>&1 &
    PIDS+=($!)
  done
  for pid in "${PIDS[@]}"; do wait "$pid"; done
  for ((i = 0; i < SHARDS; ++i)); do cat "$OUT/tests_$i.txt" && rm -f "$OUT/tests_$i.txt"; done \
    > "$OUT/tests.txt"
  grep -E "^\[ +(OK|FAILED|PASSED|SKIPPED) |seed" "$OUT/tests.txt" | head -40
  grep -A4 "Failure" "$OUT/tests.txt" | head -60
  PASSED_SHARDS=$(grep -c "^\[  PASSED  \]" "$OUT/tests.txt")
  if [[ $PASSED_SHARDS -eq $SHARDS ]] && ! grep -q "^\[  FAILED  \]" "$OUT/tests.txt"; then
    note "GPU tests: $(grep '^\[  PASSED  \]' "$OUT/tests.txt" | awk '{n += $4} END {print n}') passed in $SHARDS shards"
  else
    FAILED_TESTS=$(grep -cE '^\[  FAILED  \] .* \([0-9]+ ms\)$' "$OUT/tests.txt")
    note "GPU tests FAILED or did not finish ($PASSED_SHARDS of $SHARDS shards finished," \
      "$FAILED_TESTS tests failed; tests.txt)"
  fi
else
  note "GPU tests not run: no moekit_gpu_tests binary"
fi

step "moekit check --backend gpu"
if [[ -x $CLI ]] && "$CLI" --help 2>&1 | grep -q check; then
  if timeout 240 "$CLI" check --backend gpu > "$OUT/check.txt" 2>&1; then
    note "moekit check --backend gpu: passed"
  else
    note "moekit check --backend gpu: FAILED or timed out (exit $?)"
  fi
  tail -25 "$OUT/check.txt"
  cat "$OUT/check.txt" >> "$OUT/tests.txt" 2>/dev/null
  rm -f "$OUT/check.txt"
else
  note "moekit check not run: no CLI with a check command"
fi

step "FP8 CLI commands: --backend gpu against --backend cpu (tests/gpu/cli_fp8_gpu_check.py)"
if [[ -x $CLI ]] && python3 -c 'import torch, safetensors' 2>/dev/null; then
  if timeout 120 python3 tests/gpu/cli_fp8_gpu_check.py "$CLI"; then
    note "FP8 CLI on the GPU: passed"
  else
    note "FP8 CLI on the GPU: FAILED"
  fi
else
  note "FP8 CLI check not run (no CLI, or no torch/safetensors)"
fi

step "moekit bench --backend gpu --json"
BENCH=$OUT/bench_gpu.json
if [[ -x $CLI ]] && "$CLI" --help 2>&1 | grep -q bench; then
  if timeout 180 "$CLI" bench --backend gpu --json > "$BENCH" 2> "$OUT/bench_stderr.txt"; then
    note "moekit bench: all rows verified"
  else
    note "moekit bench: exit $? (a row failed verification, or it timed out)"
  fi
  tail -5 "$OUT/bench_stderr.txt"
  rm -f "$OUT/bench_stderr.txt"
else
  note "moekit bench not run: no CLI with a bench command"
  rm -f "$BENCH"
fi

step "peers: torch and Triton routers vs moekit (bench/gpu_route_peers.py)"
if python3 -c 'import torch, triton' 2>/dev/null; then
  ARGS=()
  [[ -s $BENCH ]] && ARGS+=("$BENCH")
  ((QUICK)) && ARGS+=(--quick)
  if PYTHONUNBUFFERED=1 timeout 240 python3 bench/gpu_route_peers.py "${ARGS[@]}" \
    > "$OUT/peers.txt" 2>&1; then
    note "peer benchmark: done (peers.txt)"
  else
    tail -20 "$OUT/peers.txt"
    note "peer benchmark: FAILED or timed out (peers.txt)"
  fi
else
  note "peer benchmark not run: torch/triton not importable"
fi

if [[ ${GPU_CHECK_ROUTE_AB:-0} == 1 && -x $CLI && -s $BENCH ]]; then
  # Each kernel generation against the rule without it: v6 (softmax rows), v5 (sigmoid rows),
  # v3 and later (all of them off: v2), v1.
  step "routing A/B: default vs MOEKIT_GPU_ROUTE_V6=0 vs MOEKIT_GPU_ROUTE_V5=0 vs V3_OFF=1 (v2) vs V1=1"
  MOEKIT_GPU_ROUTE_V6=0 timeout 120 "$CLI" bench --backend gpu --json > "$OUT/bench_no_v6.json" \
    2>/dev/null
  MOEKIT_GPU_ROUTE_V5=0 timeout 120 "$CLI" bench --backend gpu --json > "$OUT/bench_no_v5.json" \
    2>/dev/null
  MOEKIT_GPU_ROUTE_V3_OFF=1 timeout 120 "$CLI" bench --backend gpu --json > "$OUT/bench_v2.json" \
    2>/dev/null
  MOEKIT_GPU_ROUTE_V1=1 timeout 120 "$CLI" bench --backend gpu --json > "$OUT/bench_v1.json" \
    2>/dev/null
  python3 - "$BENCH" "$OUT/bench_no_v6.json" "$OUT/bench_no_v5.json" "$OUT/bench_v2.json" \
    "$OUT/bench_v1.json" <<'PY' | tee "$OUT/route_ab.txt"
import json, sys
def load(path):
    try:
        return {(r["model"], r["tokens"]): r for r in json.load(open(path))}
    except Exception:
        return {}
runs = [load(p) for p in sys.argv[1:6]]
names = ["default", "no v6", "no v5", "v2", "v1"]
print(f"{'model':20s} {'tokens':>6s} " + " ".join(f"{n:>8s}" for n in names) + "  (us)")
for key in sorted(runs[0], key=lambda k: (k[0], k[1])):
    cells = [f"{r[key]['median_us']:8.2f}" if key in r else f"{'-':>8s}" for r in runs]
    ok = all(r[key].get("verified") for r in runs if key in r)
    print(f"{key[0]:20s} {key[1]:6d} {' '.join(cells)}  {'' if ok else 'NOT VERIFIED'}")
PY
fi

step "FP8: moekit bench --op gemm|quant|linear|quantize-weight|gemm-grouped --backend gpu, and torch peers (bench/gpu_fp8_peers.py)"
FP8_JSON=$OUT/fp8_gemm.json
if [[ -x $CLI ]]; then
  timeout 60 "$CLI" bench --op quant --backend gpu > "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit bench --op quant: exit $?"
  # The linear layer's whole call at decode sizes (quantization + GEMM, as the dispatch picks).
  timeout 90 "$CLI" bench --op linear --backend gpu >> "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit bench --op linear: exit $? (a row failed verification, or it timed out)"
  timeout 60 "$CLI" bench --op quantize-weight --backend gpu >> "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit bench --op quantize-weight: exit $?"
  timeout 240 "$CLI" bench --op gemm-grouped --backend gpu >> "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit bench --op gemm-grouped: exit $? (a row failed verification, or it timed out)"
  timeout 240 "$CLI" bench --op gemm --backend gpu --json > "$FP8_JSON" 2> "$OUT/fp8_stderr.txt" \
    || note "moekit bench --op gemm: exit $? (a row failed verification, or it timed out)"
  # The plans of the decode GEMM and of the large shape (M N K), as the bench runs them, of
  # DeepGEMM's masked case (4 groups of 256 rows) ...
  for shape in "1 4096 7168" "4096 7168 16384"; do
    read -r m n k <<< "$shape"
    timeout 30 "$CLI" explain --op gemm --backend gpu --tokens "$m" --n "$n" --k "$k" \
      --static-weights >> "$OUT/fp8_bench.txt" 2>&1 || note "moekit explain --op gemm: exit $?"
  done
  timeout 30 "$CLI" explain --op gemm-grouped --backend gpu --groups 4 --tokens 256 \
    --expected-rows 256 --static-weights >> "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit explain --op gemm-grouped: exit $?"
  # ... and of a MoE prefill in DeepGEMM's contiguous layout (8 experts, 2048 rows).
  timeout 30 "$CLI" explain --op gemm-contiguous --backend gpu --groups 8 --tokens 2048 \
    --static-weights >> "$OUT/fp8_bench.txt" 2>&1 \
    || note "moekit explain --op gemm-contiguous: exit $?"

  tail -3 "$OUT/fp8_stderr.txt"
  if python3 -c 'import torch' 2>/dev/null; then
    PYTHONUNBUFFERED=1 timeout 240 python3 bench/gpu_fp8_peers.py "$FP8_JSON" \
      >> "$OUT/fp8_bench.txt" 2>&1 || note "FP8 peers: FAILED or timed out (fp8_bench.txt)"
  fi
  # The decode GEMM's stream floor: kernels that only read N=4096 K=7168's weights per call
  # (docs/perf/fp8-gpu-sm90.md, session 11); the whole table in stream_floor.txt.
  if [[ -x $BUILD/hbm_stream_floor ]]; then
    if timeout 120 "$BUILD/hbm_stream_floor" > "$OUT/stream_floor.txt" 2>&1; then
      {
        echo "stream floor (hbm_stream_floor; no arithmetic, us per call):"
        grep -E "copy bandwidth|one call reads|loads  2 blocks/SM x 512, PDL early, 8 deep|384 threads, clusters of 2" \
          "$OUT/stream_floor.txt"
      } >> "$OUT/fp8_bench.txt"
    else
      note "hbm_stream_floor: exit $? (stream_floor.txt)"
    fi
  fi
  # The fp8 wgmma rate with nothing else (bench/wgmma_rate.cu): the ceiling of the tiles kernel's
  # consumers, each row verified.
  if [[ -x $BUILD/wgmma_rate ]]; then
    if timeout 60 "$BUILD/wgmma_rate" > "$OUT/wgmma_rate.txt" 2>&1; then
      { echo "wgmma rate (wgmma_rate; shared-memory operands only):"; cat "$OUT/wgmma_rate.txt"; } \
        >> "$OUT/fp8_bench.txt"
      grep -q WRONG "$OUT/wgmma_rate.txt" && note "wgmma_rate: a row failed verification"
    else
      note "wgmma_rate: exit $? (wgmma_rate.txt)"
    fi
  fi
  cat "$OUT/fp8_bench.txt"
else
  note "FP8 bench not run: no CLI"
fi

if [[ ${GPU_CHECK_FP8_AB:-0} == 1 && -x $CLI ]]; then
  step "FP8 A/B: group quant with MOEKIT_GPU_QUANT_HINTS=1, MOEKIT_GPU_PDL=0 and" \
    "MOEKIT_GPU_QUANT_SMALL_UNITS=0; the gate_up GEMMs without early weight loads and with" \
    "pushed split sums at every token count; the tiles kernel with its scale warps, unpaired" \
    "and with K whole"
  {
    for variant in "" MOEKIT_GPU_QUANT_HINTS=1 MOEKIT_GPU_PDL=0 MOEKIT_GPU_QUANT_SMALL_UNITS=0 \
      ""; do
      echo "-- quant ${variant:-default}"
      env $variant timeout 60 "$CLI" bench --op quant --backend gpu 2>&1 | grep -E "^x bf16"
    done
    for variant in MOEKIT_SM90_EARLY=0 MOEKIT_SM90_PUSH=1 ""; do
      echo "-- gemm gate_up ${variant:-default}"
      env $variant timeout 60 "$CLI" bench --op gemm --backend gpu --model gate_up 2>&1 \
        | grep -E "gpu.sm90"
    done
    for tokens in 256 1024; do
      echo "-- tiles kernel, N=4096 K=7168 M=$tokens: default, scale warps, unpaired, K whole"
      timeout 150 python3 scripts/bench_ab.py --rounds 3 --bin "$CLI" --variant default="" \
        --variant warps="MOEKIT_SM90_TILES_SCALES=warps" --variant unpaired="MOEKIT_SM90_TILES_PAIR=0" \
        --variant whole_k="MOEKIT_SM90_TILES_SPLIT=1 MOEKIT_CUBLASLT_DEFER_SPLIT=0" \
        -- bench --op gemm --backend gpu --model "N=4096 K=7168" --tokens "$tokens" 2>&1 \
        | grep -A4 "gpu.sm90"
    done
  } | tee "$OUT/fp8_ab.txt"
fi

step "summary"
{
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  echo "gpu_check.sh on $GPU_NAME," \
    "$(($(date +%s) - START)) s"
  for line in "${SUMMARY[@]}"; do echo "  - $line"; done
  if [[ -s $BENCH ]]; then
    echo
    echo "moekit route on the GPU (CUDA-graph replay, median us per call, bf16 logits), vs target:"
    python3 - "$BENCH" <<'PY'
import json, sys
rows = {(r["model"], r["tokens"]): r for r in json.load(open(sys.argv[1]))}
targets = [(m, t, 2.0) for m in sorted({m for m, _ in rows}) for t in (1, 16, 64)]
targets += [("Qwen3.5-35B-A3B", 8192, 6.0), ("Qwen3-30B-A3B", 16384, 6.0),
            ("Qwen3-Next-80B-A3B", 8192, 10.0), ("DeepSeek-V3", 8192, 8.0)]
missed = 0
print(f"  {'model':20s} {'tokens':>6s} {'us':>8s} {'target':>7s} {'peer us':>8s}  verified")
for model, tokens, target in targets:
    r = rows.get((model, tokens))
    if not r:
        continue
    us = r["median_us"]
    missed += us > target
    peer = f"{r['peer_us']:.2f}" if r.get("peer_us") else "-"
    print(f"  {model:20s} {tokens:6d} {us:8.2f} {target:6.1f}{'!' if us > target else ' '} "
          f"{peer:>8s}  {'yes' if r.get('verified') else 'NO'}")
print(f"  targets missed: {missed} ('!')")
PY
  fi
  if [[ -s $OUT/peers.txt ]]; then
    echo
    sed -n '/^CUDA-graph replay/,$p' "$OUT/peers.txt"
  fi
  if [[ -s $OUT/fp8_bench.txt ]]; then
    echo
    cat "$OUT/fp8_bench.txt"
  fi
} | tee "$OUT/summary.txt"

# Pack the step outputs into one archive (the log and the summary stay beside it).
(
  cd "$OUT" || exit 0
  packed=()
  for f in tests.txt bench_gpu.json peers.txt bench_no_v6.json bench_no_v5.json bench_v2.json \
    bench_v1.json route_ab.txt fp8_bench.txt fp8_gemm.json fp8_stderr.txt fp8_ab.txt build.txt; do
    [[ -e $f ]] && packed+=("$f")
  done
  if ((${#packed[@]})) && tar czf gpu_check_files.tgz "${packed[@]}"; then
    rm -f "${packed[@]}"
  fi
)
