#!/usr/bin/env python3
"""Interleaved A/B timing of `moekit bench`: settings of one binary, or several binaries.

  scripts/bench_ab.py [--rounds N] [--bin PATH] [--out FILE] --variant LABEL=SPEC ... \\
      -- BENCH_ARGS...

Each SPEC is a space-separated list of ENV=VALUE settings, bench options of its own (items that
start with --, added to the bench arguments) and at most one binary path (default --bin,
build/gpu/moekit), for example

  scripts/bench_ab.py --variant one="MOEKIT_SM90_TILES_OVERLAP=0" --variant two="" \\
      -- bench --op gemm --backend gpu --model "N=7168 K=16384" --tokens 4096
  scripts/bench_ab.py --variant main=.stage/moekit_main --variant ring=.stage/moekit_ring \\
      -- bench --op gemm --backend gpu --tokens 1024
  scripts/bench_ab.py --variant sm90="--implementation=gpu.sm90" \\
      --variant lt="--implementation=gpu.cublaslt" -- bench --op gemm --backend gpu --tokens 2048

Every round runs every variant once, in order (so drift in the card's clock spreads over all of
them), with --json added. The table gives, per bench row and variant, each round's median us and
the best; a row that any run did not verify is marked. The raw rows go to --out (JSON) when given.
Exit status: 0, or 1 when a run failed or a row was not verified.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys


def parse_variant(text, default_bin):
    label, sep, spec = text.partition("=")
    if not sep or not label:
        sys.exit(f"bench_ab.py: --variant {text!r}: expected LABEL=SPEC")
    env, binary, options = {}, default_bin, []
    for item in shlex.split(spec):
        name, eq, value = item.partition("=")
        if item.startswith("--"):
            options.append(item)
        elif eq and name and "/" not in name:
            env[name] = value
        elif binary is default_bin:
            binary = item
        else:
            sys.exit(f"bench_ab.py: --variant {text!r}: two binaries")
    return label, env, binary, options


def row_key(row):
    # CPU rows name "model" and "tokens", GPU rows "shape" and "m".
    model = row.get("model", row.get("shape", ""))
    tokens = row.get("tokens", row.get("m", ""))
    parts = [str(row.get("op", "")), str(model), f"M={tokens}"]
    if "implementation" in row:
        parts.append(str(row["implementation"]))
    return " | ".join(parts)


def main():
    parser = argparse.ArgumentParser(add_help=True, usage=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bin", default="build/gpu/moekit")
    parser.add_argument("--out", default="")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if len(args.variant) < 2 or not bench_args:
        sys.exit("bench_ab.py: give two or more --variant and, after --, the bench arguments")
    if args.rounds < 1:
        sys.exit(f"bench_ab.py: --rounds {args.rounds}: need at least 1")
    variants = [parse_variant(v, args.bin) for v in args.variant]

    times = {}  # key -> label -> [us per round]
    unverified, failed, raw = set(), [], []
    for round_index in range(args.rounds):
        for label, env, binary, options in variants:
            command = [binary] + bench_args + options + ["--json"]
            try:
                run = subprocess.run(command, env={**os.environ, **env}, capture_output=True,
                                     text=True)
            except OSError as error:
                failed.append(f"{label}, round {round_index + 1}: {error}")
                continue
            try:
                rows = json.loads(run.stdout)
            except json.JSONDecodeError:
                rows = None
            if rows is None:
                last = (run.stderr.strip().splitlines() or [""])[-1]
                failed.append(f"{label}, round {round_index + 1}: exit {run.returncode}: {last}")
                continue
            if run.returncode != 0:
                failed.append(f"{label}, round {round_index + 1}: exit {run.returncode}")
            for row in rows:
                key = row_key(row)
                times.setdefault(key, {}).setdefault(label, []).append(row["median_us"])
                if not row.get("verified", False):
                    unverified.add(key)
                raw.append({"variant": label, "round": round_index + 1, **row})

    labels = [label for label, _, _, _ in variants]
    width = max([len(k) for k in times] + [10])
    print(f"{args.rounds} interleaved rounds; us per call (each round), best")
    for label, env, binary, options in variants:
        settings = " ".join([f"{k}={v}" for k, v in env.items()] + options)
        print(f"  {label}: {binary}{' ' + settings if settings else ''}")
    for key in times:
        print(f"{key:{width}s}" + ("  NOT VERIFIED" if key in unverified else ""))
        best_overall = min(min(ts) for ts in times[key].values())
        for label in labels:
            ts = times[key].get(label, [])
            if not ts:
                print(f"  {label:>12s}: no row")
                continue
            cells = " / ".join(f"{t:.2f}" for t in ts)
            print(f"  {label:>12s}: {cells}   best {min(ts):.2f}  ({min(ts) / best_overall:.3f}x)")
    for line in failed:
        print(f"failed: {line}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(raw, f, indent=1)
    return 1 if failed or unverified else 0


if __name__ == "__main__":
    sys.exit(main())
