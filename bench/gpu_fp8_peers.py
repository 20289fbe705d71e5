#!/usr/bin/env python3
"""FP8 GEMM peers on the GPU, for the table in scripts/gpu_check.sh and docs/perf/fp8.md.

For each shape (M tokens, weight N x K), times with CUDA-graph replay, weights rotating over copies
larger than L2 (as moekit's bench does):
  - torch._scaled_mm with DeepSeek block scales (1x128 activations, 128x128 weights): cuBLASLt;
  - torch._scaled_mm with per-tensor scales (the plain FP8 GEMM, no block scaling);
  - a bf16 matmul of the dequantized weight (what a model without FP8 kernels would do).
Optionally reads `moekit bench --op gemm --backend gpu --json` output and prints moekit beside.
Usage: gpu_fp8_peers.py [moekit_gemm.json]
"""
import json
import os
import sys

import torch

# MOEKIT_BENCH_COLD_REPLAY=1: each timed replay launched on an idle GPU (before session 40).
COLD = os.environ.get("MOEKIT_BENCH_COLD_REPLAY") == "1"

SHAPES = [
    (4096, 7168, 16384),
    (1, 4096, 7168), (4, 4096, 7168), (16, 4096, 7168), (64, 4096, 7168), (256, 4096, 7168),
    (1024, 4096, 7168),
    (1, 4096, 2048), (16, 4096, 2048), (256, 4096, 2048), (1024, 4096, 2048),
    (1, 7168, 2048), (16, 7168, 2048), (256, 7168, 2048),
]


def graph_us(fn, calls):
    """Median microseconds per call of `calls` captured calls of fn(i)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if not COLD:  # an untimed replay ahead: the host's launch stays out (moekit's bench alike)
            graph.replay()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def peers(m, n, k):
    dev = "cuda"
    fp8 = torch.float8_e4m3fn
    copies = max(1, min(16, (256 << 20) // (n * k)))
    ws = [(torch.rand(n, k, device=dev) * 2 - 1).mul(448).to(fp8) for _ in range(copies)]
    nb, kb = (n + 127) // 128, (k + 127) // 128
    w_scales = torch.rand(nb, kb, device=dev) * 0.01
    a = (torch.rand(m, k, device=dev) * 2 - 1).mul(448).to(fp8)
    a_scales = torch.rand(m, kb, device=dev) * 0.01
    # Reference for verification: dequantized float product.
    a_deq = a.float() * a_scales.repeat_interleave(128, dim=1)[:, :k]
    w_deq = ws[0].float() * w_scales.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    ref = a_deq @ w_deq.t()
    result = {}

    # torch._scaled_mm, block scales: a scales outer-dim-major, weight scales [N/128, K/128].
    try:
        sa = a_scales.t().contiguous().t()
        def block(i):
            return torch._scaled_mm(a, ws[i % copies].t(), scale_a=sa, scale_b=w_scales.t(),
                                    out_dtype=torch.bfloat16)
        out = block(0).float()
        err = (out - ref).abs().mean() / ref.abs().mean()
        if err > 1e-2:
            raise RuntimeError(f"rel error {err:.3g}")
        result["block"] = graph_us(block, max(copies, 4))
    except Exception as e:  # noqa: BLE001 - a refusal is a result
        result["block"] = None
        result["block_error"] = str(e).splitlines()[0][:80]

    # torch._scaled_mm, per-tensor scales.
    try:
        one = torch.ones((), device=dev)
        def tensorwise(i):
            return torch._scaled_mm(a, ws[i % copies].t(), scale_a=one, scale_b=one,
                                    out_dtype=torch.bfloat16)
        tensorwise(0)
        result["tensorwise"] = graph_us(tensorwise, max(copies, 4))
    except Exception as e:  # noqa: BLE001
        result["tensorwise"] = None
        result["tensorwise_error"] = str(e).splitlines()[0][:80]

    # bf16 matmul of the dequantized weight.
    wb = [w.to(torch.bfloat16) for w in ws[: max(1, copies // 2)]]
    ab = a_deq.to(torch.bfloat16)
    result["bf16"] = graph_us(lambda i: ab @ wb[i % len(wb)].t(), max(len(wb), 4))
    return result


def main():
    ours = {}
    if len(sys.argv) > 1:
        for r in json.load(open(sys.argv[1])):
            key = (r["m"], r["n"], r["k"])
            if r.get("verified"):
                ours.setdefault(key, {})[r["implementation"]] = r["median_us"]
                if r.get("dispatched"):
                    ours[key]["picked"] = r["implementation"]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if len(sys.argv) > 1:
        print("moekit block_fp8_gemm, every GPU implementation that serves (bf16 out; "
              "* = the dispatch's pick):")
        print(f"{'M':>5s} {'N':>6s} {'K':>6s} {'implementation':>15s} {'us':>9s} {'TFLOP/s':>8s} "
              f"{'% HBM floor':>11s}  verified")
        for r in json.load(open(sys.argv[1])):
            mark = "*" if r.get("dispatched") else " "
            floor = 100.0 * r["roofline_us"] / r["median_us"]
            print(f"{r['m']:5d} {r['n']:6d} {r['k']:6d} {mark + r['implementation']:>15s} "
                  f"{r['median_us']:9.2f} {r['tflop_per_s']:8.1f} {floor:10.1f}%  "
                  f"{'yes' if r['verified'] else 'NO'}")
    print("CUDA-graph replay, median us per call (TFLOP/s); bf16 out")
    head = (f"{'M':>5s} {'N':>6s} {'K':>6s} | {'scaled_mm blk':>18s} {'scaled_mm tensor':>18s} "
            f"{'bf16 dequant':>18s} | {'moekit picked':>24s} {'vs blk':>7s}")
    print(head)
    for m, n, k in SHAPES:
        r = peers(m, n, k)
        flops = 2.0 * m * n * k

        def cell(us):
            return f"{us:8.2f} ({flops / us / 1e6:6.1f})" if us else f"{'refused':>17s}"
        mine = ours.get((m, n, k), {})
        picked = mine.get("picked")
        us = mine.get(picked) if picked else None
        ours_cell = f"{picked} {us:.2f}" if us else "-"
        ratio = f"{r['block'] / us:6.2f}x" if us and r["block"] else "-"
        print(f"{m:5d} {n:6d} {k:6d} | {cell(r['block'])} {cell(r['tensorwise'])} "
              f"{cell(r['bf16'])} | {ours_cell:>24s} {ratio:>7s}")
        if r.get("block_error"):
            print(f"      scaled_mm blk: {r['block_error']}")


if __name__ == "__main__":
    main()
