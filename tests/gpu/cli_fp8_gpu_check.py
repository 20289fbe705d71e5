#!/usr/bin/env python3
"""The FP8 CLI commands with --backend gpu against --backend cpu, on the GPU machine.

Writes random inputs (safetensors), runs `moekit quant|gemm|quantize-weight` on both backends and
compares: quantized bytes and scales equal (but for e4m3 NaN signs and rounding near-ties, which
these inputs do not produce), GEMM outputs within the contract's tolerance. Exit code 1 on any
difference. Usage: cli_fp8_gpu_check.py path/to/moekit
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file


def run(cli, *args):
    result = subprocess.run([cli, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")


def both(cli, command, src, extra, tmp):
    outs = {}
    for backend in ("cpu", "gpu"):
        dst = os.path.join(tmp, f"{command}_{backend}.safetensors")
        run(cli, command, "--input", src, "--output", dst, "--backend", backend, *extra)
        outs[backend] = load_file(dst)
    return outs["cpu"], outs["gpu"]


def main():
    cli = sys.argv[1]
    torch.manual_seed(1234)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        # quant: bf16 x [67, 1024], every layout.
        src = os.path.join(tmp, "x.safetensors")
        save_file({"x": torch.randn(67, 1024, dtype=torch.bfloat16) * 3}, src)
        for layout in ("row", "col", "col-tma", "packed"):
            extra = ["--group-size", "128", "--layout", layout]
            if layout == "packed":
                extra.append("--ue8m0")
            cpu, gpu = both(cli, "quant", src, extra, tmp)
            same = all(torch.equal(cpu[key].view(torch.uint8), gpu[key].view(torch.uint8))
                       for key in cpu)
            print(f"quant --layout {layout}: {'same bytes' if same else 'DIFFERENT'}")
            failures += not same
        # quantize-weight: f32 weight [300, 520] (partial blocks).
        src = os.path.join(tmp, "w.safetensors")
        save_file({"weight": torch.randn(300, 520)}, src)
        cpu, gpu = both(cli, "quantize-weight", src, [], tmp)
        same = torch.equal(cpu["weight"].view(torch.uint8), gpu["weight"].view(torch.uint8)) and \
            torch.equal(cpu["weight_scale_inv"], gpu["weight_scale_inv"])
        print(f"quantize-weight: {'same bytes' if same else 'DIFFERENT'}")
        failures += not same
        # gemm: M=33, N=384, K=640, bias, f32 out.
        src = os.path.join(tmp, "g.safetensors")
        m, n, k = 33, 384, 640
        fp8 = torch.float8_e4m3fn
        save_file({
            "a": ((torch.rand(m, k) * 2 - 1) * 448).to(fp8),
            "a_scales": torch.rand(m, (k + 127) // 128) * 0.01,
            "b": ((torch.rand(n, k) * 2 - 1) * 448).to(fp8),
            "b_scales": torch.rand((n + 127) // 128, (k + 127) // 128) * 0.01,
            "bias": torch.randn(n),
        }, src)
        cpu, gpu = both(cli, "gemm", src, ["--out-dtype", "f32"], tmp)
        error = ((gpu["out"] - cpu["out"]).abs().mean() / cpu["out"].abs().mean()).item()
        print(f"gemm: mean relative difference {error:.3g} (tolerance 1e-3)")
        failures += not error < 1e-3
    print("FP8 CLI on the GPU:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
