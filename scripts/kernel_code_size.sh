#!/usr/bin/env bash
# Bytes of SASS per kernel of the GPU sources, for sm_90a (no GPU needed: nvcc and readelf only):
#   scripts/kernel_code_size.sh [SOURCE.cu ...]   default: the Hopper GEMM and the routing kernels
# A kernel whose path runs once per tile or per call (an epilogue, a prologue) is fetched from L2
# each time: session 16 found the tiles kernel's 57 KB epilogue stalling on instruction fetch
# (docs/perf/fp8-gpu-sm90.md). Large numbers here are worth a look before a profile.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x $NVCC ]] || { echo "kernel_code_size.sh: no nvcc (set NVCC)" >&2; exit 1; }
sources=("$@")
[[ ${#sources[@]} -gt 0 ]] || sources=(src/gpu/fp8_gemm_sm90.cu src/gpu/route_gpu.cu)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for source in "${sources[@]}"; do
  cubin=$tmp/$(basename "$source" .cu).cubin
  "$NVCC" -DMOEKIT_HAVE_GPU=1 -I src -I include -O3 -arch=sm_90a --expt-relaxed-constexpr \
    -std=c++20 -x cu -cubin "$source" -o "$cubin"
  echo "== $source (sm_90a)"
  readelf -SW "$cubin" 2>/dev/null | python3 -c '
import re, subprocess, sys
rows = []
for line in sys.stdin:
    m = re.search(r"\s\.text\.(\S+)\s+PROGBITS\s+\S+\s+\S+\s+([0-9a-f]+)", line)
    if m:
        rows.append((int(m.group(2), 16), m.group(1)))
names = [n for _, n in rows]
try:
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                           check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    pass
for (size, _), name in sorted(zip(rows, names), reverse=True):
    name = re.sub(r"moekit::gpu::\(anonymous namespace\)::", "", name)
    print(f"{size:8d}  {name[:150]}")
'
done
