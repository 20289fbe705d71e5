#!/usr/bin/env python3
"""moekit's GPU router against two peers on the model-table shapes, one table.

Peers, both timed the way moekit is (CUDA-graph replay, CUDA events, median per call, bf16 logits):
  torch   the routing math as a chain of torch ops (softmax / sigmoid, grouped masking, topk,
          gather, renormalize), as SGLang's torch-native fallback does it;
  triton  a straightforward fused Triton router written for this comparison: one program per row,
          tl.softmax / tl.sigmoid, group scores by masked maxima, K rounds of tl.argmax.
Both are checked against each other first (ids equal as sets up to exact ties, weights close).
moekit's own times come from `moekit bench --backend gpu --json > FILE`, passed as argv[1]
(keys "model", "tokens", "median_us"). Without it, the moekit columns print "-".

Usage: python3 bench/gpu_route_peers.py [moekit_bench.json] [--quick]
"""
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

# The model table of shared/spec/routing.md: (name, E, K incl. shared, scoring, G, TG, group score,
# bias, rsf, renormalize, shared slots).
MODELS = [
    ("Mixtral-8x7B", 8, 2, "softmax", 1, 1, "max", False, 1.0, True, 0),
    ("Qwen1.5-MoE-A2.7B", 60, 4, "softmax", 1, 1, "max", False, 1.0, False, 0),
    ("Qwen2-57B-A14B", 64, 8, "softmax", 1, 1, "max", False, 1.0, False, 0),
    ("Qwen3-30B-A3B", 128, 8, "softmax", 1, 1, "max", False, 1.0, True, 0),
    ("Qwen3-235B-A22B", 128, 8, "softmax", 1, 1, "max", False, 1.0, True, 0),
    ("Qwen3.5-35B-A3B", 256, 8, "softmax", 1, 1, "max", False, 1.0, True, 0),
    ("Qwen3-Next-80B-A3B", 512, 10, "softmax", 1, 1, "max", False, 1.0, True, 0),
    ("DeepSeek-V2", 160, 6, "softmax", 8, 3, "max", False, 16.0, False, 0),
    ("DeepSeek-V3", 256, 9, "sigmoid", 8, 4, "top2_sum", True, 2.5, True, 1),
    ("Kimi-K2", 384, 9, "sigmoid", 1, 1, "max", True, 2.827, True, 1),
    ("GLM-4.5", 160, 9, "sigmoid", 1, 1, "max", True, 2.5, True, 1),
]
DECODE_TOKENS = [1, 16, 64]
# Prefill targets (microseconds on H100, kernel time in a CUDA graph).
PREFILL = [("Qwen3.5-35B-A3B", 8192, 6.0), ("Qwen3-30B-A3B", 16384, 6.0),
           ("Qwen3-Next-80B-A3B", 8192, 10.0), ("DeepSeek-V3", 8192, 8.0)]
DECODE_TARGET_US = 2.0


def torch_route(logits, bias, m):
    """The routing math in torch ops; returns (weights f32 [T, K], ids i32 [T, K], selection)."""
    _, E, K, scoring, G, TG, group_score, _, rsf, renormalize, S = m
    Kr = K - S
    x = logits.float()
    if scoring == "softmax":
        z = x + bias if bias is not None else x
        source = torch.softmax(z, dim=-1)
        selection = source
    else:
        source = torch.sigmoid(x)
        selection = source + bias if bias is not None else source
    ranked = selection
    if G > 1:
        grouped = selection.view(-1, G, E // G)
        if group_score == "top2_sum":
            scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            scores = grouped.amax(dim=-1)
        kept = scores.topk(TG, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
        mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        ranked = selection.masked_fill(~mask, float("-inf"))
    ids = ranked.topk(Kr, dim=-1).indices
    weights = source.gather(1, ids)
    routed_sum = weights.sum(dim=-1, keepdim=True)
    if S > 0:
        weights = torch.cat([weights, (routed_sum / rsf).expand(-1, S)], dim=-1)
        shared = torch.arange(E, E + S, device=ids.device).expand(ids.shape[0], S)
        ids = torch.cat([ids, shared], dim=-1)
    if renormalize:
        weights = weights / torch.where(routed_sum > 0, routed_sum, torch.ones_like(routed_sum))
    return weights, ids.to(torch.int32), selection


@triton.jit
def _route_row(logits_ptr, bias_ptr, weights_ptr, ids_ptr, row_stride,
               E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, KR: tl.constexpr,
               BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
               G: tl.constexpr, BLOCK_G: tl.constexpr, TG: tl.constexpr, EPG: tl.constexpr,
               TOP2: tl.constexpr, RENORMALIZE: tl.constexpr, RSF: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + row * row_stride + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_E], dtype=tl.float32)
    if SOFTMAX:
        source = tl.softmax(tl.where(valid, x + b, float("-inf")))
        selection = tl.where(valid, source, float("-inf"))
    else:
        source = tl.sigmoid(x)
        selection = tl.where(valid, source + b, float("-inf"))
    if G > 1:
        group = offs // EPG
        offs_g = tl.arange(0, BLOCK_G)
        scores = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for g in tl.static_range(G):
            members = tl.where(group == g, selection, float("-inf"))
            first = tl.max(members, axis=0)
            if TOP2:
                at = tl.argmax(members, axis=0)
                first = first + tl.max(tl.where(offs == at, float("-inf"), members), axis=0)
            scores = tl.where(offs_g == g, first, scores)
        allowed = offs < 0
        for _ in tl.static_range(TG):
            best = tl.argmax(scores, axis=0)
            allowed = allowed | (group == best)
            scores = tl.where(offs_g == best, float("-inf"), scores)
        selection = tl.where(allowed, selection, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    slot_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    slot_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(KR):
        at = tl.argmax(selection, axis=0)
        slot_weights = tl.where(offs_k == k, tl.sum(tl.where(offs == at, source, 0.0), axis=0),
                                slot_weights)
        slot_ids = tl.where(offs_k == k, at, slot_ids)
        selection = tl.where(offs == at, float("-inf"), selection)
    routed_sum = tl.sum(tl.where(offs_k < KR, slot_weights, 0.0), axis=0)
    shared = (offs_k >= KR) & (offs_k < K)
    slot_weights = tl.where(shared, routed_sum / RSF, slot_weights)
    slot_ids = tl.where(shared, E + offs_k - KR, slot_ids)
    if RENORMALIZE:
        slot_weights = slot_weights / tl.where(routed_sum > 0, routed_sum, 1.0)
    tl.store(weights_ptr + row * K + offs_k, slot_weights, mask=offs_k < K)
    tl.store(ids_ptr + row * K + offs_k, slot_ids, mask=offs_k < K)


def triton_route(logits, bias, m, weights, ids):
    _, E, K, scoring, G, TG, group_score, _, rsf, renormalize, S = m
    block_e = triton.next_power_of_2(E)
    _route_row[(logits.shape[0],)](
        logits, bias if bias is not None else logits, weights, ids, logits.stride(0),
        E=E, BLOCK_E=block_e, K=K, KR=K - S, BLOCK_K=triton.next_power_of_2(K),
        SOFTMAX=scoring == "softmax", HAS_BIAS=bias is not None, G=G,
        BLOCK_G=triton.next_power_of_2(G), TG=TG, EPG=E // G, TOP2=group_score == "top2_sum",
        RENORMALIZE=renormalize, RSF=float(rsf), num_warps=1 if block_e <= 512 else 4)


def graph_time_us(fn, calls=20, replays=50):
    """Median microseconds per call over CUDA-graph replays of `calls` captured calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        if os.environ.get("MOEKIT_BENCH_COLD_REPLAY") != "1":
            graph.replay()  # untimed, ahead: the host's launch stays out (moekit's bench alike)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / calls)
    return statistics.median(samples)


def copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e-3)
    return 2.0 * src.numel() * src.element_size() / statistics.median(samples) / 1e9


def agree(a, b, selection):
    """Ids equal as sets except where exact ties decide; weights close. Returns (ok, detail)."""
    (wa, ia), (wb, ib) = a, b
    ia, ib = ia.long(), ib.long()
    E = selection.shape[1]
    routed_a, routed_b = ia.clamp(max=E - 1), ib.clamp(max=E - 1)
    # Same multiset of selection scores means any id difference is a tie.
    sa = selection.gather(1, routed_a).sort(dim=1, descending=True).values
    sb = selection.gather(1, routed_b).sort(dim=1, descending=True).values
    scores_ok = torch.allclose(sa, sb, rtol=1e-6, atol=0.0)
    same_ids = (ia.sort(dim=1).values == ib.sort(dim=1).values).all(dim=1)
    weights_err = (wa.sort(dim=1).values - wb.sort(dim=1).values).abs()[same_ids]
    max_err = weights_err.max().item() if weights_err.numel() else 0.0
    ok = scores_ok and max_err < 1e-4
    return ok, f"{int((~same_ids).sum())} rows differ only by ties, max weight diff {max_err:.1e}"


def load_moekit(path):
    if not path:
        return {}
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        print(f"note: could not read moekit bench JSON {path}: {e}")
        return {}
    return {(r["model"], int(r["tokens"])): r for r in rows if r.get("backend", "gpu") == "gpu"}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    moekit = load_moekit(args[0] if args else None)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs()
    print(f"{device}; torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bandwidth:.0f} GB/s (read + write)")

    shapes = [(m, t, DECODE_TARGET_US) for m in MODELS for t in DECODE_TOKENS]
    by_name = {m[0]: m for m in MODELS}
    shapes += [(by_name[name], t, target) for name, t, target in PREFILL]
    if quick:
        shapes = [s for s in shapes if s[1] in (1, 8192, 16384)]

    header = (f"{'model':20s} {'E':>4s} {'K':>3s} {'tokens':>6s} {'moekit':>8s} {'torch':>8s} "
              f"{'triton':>8s} {'torch/mk':>8s} {'trit/mk':>8s} {'mk GB/s':>8s} {'of copy':>7s} "
              f"{'target':>7s}  check")
    lines = []
    misses = 0
    for m, tokens, target in shapes:
        name, E, K, _, _, _, _, has_bias, _, _, _ = m
        logits = (torch.randn(tokens, E, device="cuda") * 2.0).to(torch.bfloat16)
        bias = (torch.randn(E, device="cuda") * 0.5) if has_bias else None
        weights = torch.empty(tokens, K, dtype=torch.float32, device="cuda")
        ids = torch.empty(tokens, K, dtype=torch.int32, device="cuda")
        ref_w, ref_i, selection = torch_route(logits, bias, m)
        triton_route(logits, bias, m, weights, ids)
        torch.cuda.synchronize()
        ok, detail = agree((ref_w, ref_i), (weights, ids), selection)
        torch_us = graph_time_us(lambda: torch_route(logits, bias, m))
        triton_us = graph_time_us(lambda: triton_route(logits, bias, m, weights, ids))
        row = moekit.get((name, tokens))
        bytes_moved = tokens * E * 2 + (E * 4 if has_bias else 0) + tokens * K * 8
        if row:
            mk = float(row["median_us"])
            gbs = bytes_moved / (mk * 1e-6) / 1e9
            met = mk <= target
            misses += not met
            cols = (f"{mk:8.2f} {torch_us:8.2f} {triton_us:8.2f} {torch_us / mk:7.1f}x "
                    f"{triton_us / mk:7.1f}x {gbs:8.0f} {100 * gbs / bandwidth:6.1f}% "
                    f"{target:6.1f}{' ' if met else '!'}")
            if not row.get("verified", True):
                detail = "moekit NOT VERIFIED; " + detail
        else:
            cols = (f"{'-':>8s} {torch_us:8.2f} {triton_us:8.2f} {'-':>8s} {'-':>8s} {'-':>8s} "
                    f"{'-':>7s} {target:6.1f} ")
        line = (f"{name:20s} {E:4d} {K:3d} {tokens:6d} {cols} "
                f"{'ok' if ok else 'PEERS DISAGREE'} ({detail})")
        print(line, flush=True)
        lines.append(line)

    print()
    print("CUDA-graph replay, median us per call, bf16 logits; mk = moekit; '!' = over target")
    print(header)
    for line in lines:
        print(line)
    if moekit:
        print(f"moekit targets missed: {misses}")


if __name__ == "__main__":
    main()
