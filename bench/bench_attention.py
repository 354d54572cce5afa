"""Memory attention benchmark: milliseconds to decode one 640×480 query map, against the bank size t.

decode_map of a [480, 640, l] principal-query map over a [t, d] bank (random rows; the cost does not depend on the values),
in chunks of `chunk` pixels, under torch.no_grad (inference: rendering a feature map for a text query). The first call of
every setting is a warm-up and is not timed.

Usage: python bench/bench_attention.py [--banks 64 256 1024] [--l 16] [--d 512] [--repeats 2] [--out bench/results/attention]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from machine import describe, machine_info, write_report  # bench/machine.py
from m3_memory.core.memory.attention import MemoryAttention

H, W = 480, 640


def time_decode(t: int, l: int, d: int, chunk: int, repeats: int, device: str) -> dict:
    """Median seconds of decode_map on one [H, W, l] map with a [t, d] bank."""
    g = torch.Generator().manual_seed(t)
    module = MemoryAttention(l, torch.randn(t, d, generator=g), chunk=chunk).to(device)
    query_map = torch.randn(H, W, l, generator=g).to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            module.decode_map(query_map)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    flops = 2 * H * W * t * (l + d)  # scores through Wm k̂ᵀ [l, t], then the weighted sum of the bank
    return {"t": t, "l": l, "d": d, "chunk": chunk, "ms_per_map": 1e3 * seconds, "gflop_per_map": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "repeats": repeats, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--banks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--l", type=int, default=16)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention")
    args = ap.parse_args()
    machine, rows = machine_info(args.device), []
    for t in args.banks:
        rows.append(time_decode(t, args.l, args.d, args.chunk, args.repeats, args.device))
        print(json.dumps(rows[-1]), flush=True)
    report = {"benchmark": "memory attention decode_map, 640x480", "machine": machine, "rows": rows}
    lines = [
        "# Memory attention: one 640×480 map decoded from a [t, d] bank",
        "",
        f"Machine: {describe(machine)}; device {args.device}.",
        "",
        f"`MemoryAttention.decode_map`, l = {args.l}, d = {args.d}, chunk = {args.chunk} pixels, no grad, "
        f"median of {args.repeats} runs after a warm-up.",
        "",
        "| t | ms per map | GFLOP per map | GFLOP/s |",
        "|---|---|---|---|",
    ] + [f"| {r['t']:,} | {r['ms_per_map']:.0f} | {r['gflop_per_map']:.1f} | {r['gflop_per_s']:.1f} |" for r in rows]
    write_report(args.out, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
