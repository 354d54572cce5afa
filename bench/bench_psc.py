"""PSC benchmark: our exact Algorithm 1 vs the naive O(N²) greedy cover, on synthetic pixel features.

Features imitate upsampled patch features of a multi-view capture: per image of 160×120 pixels, a background and twelve
rectangular objects, each with a label out of K shared centres (centres share a common direction, as real embeddings do:
inter-centre cosine ≈ 0.5) plus a per-instance offset (instances of one label: cosine ≈ 0.75); every 8×8 patch adds patch
noise (patches of one instance: cosine ≈ 0.95), every pixel a little interpolation noise. Pixels are stored in raster order as a float16 memmap, like the on-disk feature cache.

Each method runs in a fresh subprocess that opens the memmap, and reports wall time and the peak memory it added (peak
RSS from getrusage, and peak anonymous memory sampled every 5 ms from /proc, which excludes memmap page cache).
The naive reference is the authors' form: normalise all rows (float32), then per chunk of rows a [chunk, N] similarity
block and a Python loop over the chunk. It is skipped above --naive-max rows; its time there is extrapolated as N².

Usage: python bench/bench_psc.py [--sizes 50000 200000 1000000] [--naive-max 200000] [--out bench/results/psc]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from m3_memory.core.memory.psc import PSCConfig, principal_scene_components

IMAGE_H, IMAGE_W, PATCH = 120, 160, 8


def make_features(path: Path, n: int, d: int, k: int = 400, seed: int = 0) -> np.memmap:
    """Write n synthetic pixel features [n, d] float16 to path (see module docstring); returns the memmap."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.0 * torch.randn(d, generator=g) + torch.randn(k, d, generator=g)
    out = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    ph, pw = IMAGE_H // PATCH, IMAGE_W // PATCH
    for start in range(0, n, IMAGE_H * IMAGE_W):
        labels = torch.full((ph, pw), int(torch.randint(k, (1,), generator=g)))
        instance = torch.zeros(ph, pw, d)
        instance[:] = 0.8 * torch.randn(d, generator=g)
        for _ in range(12):
            y0, x0 = int(torch.randint(ph - 2, (1,), generator=g)), int(torch.randint(pw - 2, (1,), generator=g))
            y1 = y0 + 2 + int(torch.randint(ph - y0 - 1, (1,), generator=g))
            x1 = x0 + 2 + int(torch.randint(pw - x0 - 1, (1,), generator=g))
            labels[y0:y1, x0:x1] = int(torch.randint(k, (1,), generator=g))
            instance[y0:y1, x0:x1] = 0.8 * torch.randn(d, generator=g)
        patches = centres[labels] + instance + 0.3 * torch.randn(ph, pw, d, generator=g)
        pixels = patches.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1).reshape(-1, d)
        pixels = pixels + 0.05 * torch.randn(pixels.shape, generator=g)
        stop = min(start + pixels.shape[0], n)
        out[start:stop] = pixels[: stop - start].half().numpy()
    out.flush()
    return out


def naive_psc(features: np.ndarray, threshold: float, chunk: int = 2048) -> np.ndarray:
    """The authors' greedy cover, O(N²·d) time, O(chunk·N) memory: kept row indices [t]."""
    unit = torch.from_numpy(np.asarray(features, dtype=np.float32))
    unit = unit / unit.norm(dim=1, keepdim=True)
    used = torch.zeros(unit.shape[0], dtype=torch.bool)
    kept = []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start:start + chunk] @ unit.T
        for j in range(sims.shape[0]):
            if used[start + j]:
                continue
            similar = torch.nonzero(sims[j] >= threshold).squeeze(1)
            if not used[similar].any():
                kept.append(start + j)
                used[similar] = True
    return np.array(kept, dtype=np.int64)


def _anon_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))


def worker(method: str, path: str, n: int, d: int, threshold: float, out_npy: str) -> dict:
    """Run one method in this process; returns time and peak memory added (MiB)."""
    features = np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_anon, peak_anon, stop = _anon_kb(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _anon_kb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if method == "ours":
        kept = principal_scene_components(features, PSCConfig(threshold)).indices.numpy()
    else:
        kept = naive_psc(features, threshold)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    np.save(out_npy, kept)
    return {
        "seconds": seconds,
        "peak_rss_added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
        "peak_anon_added_mib": (max(peak_anon[0], _anon_kb()) - base_anon) / 1024,
        "t": int(kept.size),
    }


def run_worker(method: str, path: Path, n: int, d: int, threshold: float, out_npy: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--path", str(path), "--n", str(n), "--d", str(d),
           "--threshold", str(threshold), "--out-npy", str(out_npy)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "gpu": None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "note": "2-core CPU box shared with other agents running at the same time: timings are approximate",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--naive-max", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "psc")
    ap.add_argument("--worker")
    ap.add_argument("--path")
    ap.add_argument("--n", type=int)
    ap.add_argument("--out-npy")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.n, args.d, args.threshold, args.out_npy)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"features_{n}.f16"
            make_features(path, n, args.d)
            ours = run_worker("ours", path, n, args.d, args.threshold, Path(tmp) / "ours.npy")
            row = {"n": n, "d": args.d, "threshold": args.threshold, "t": ours["t"], "reduction_ratio": n / ours["t"],
                   "ours": ours, "naive": None, "identical": None, "naive_seconds_extrapolated": None}
            if n <= args.naive_max:
                naive = run_worker("naive", path, n, args.d, args.threshold, Path(tmp) / "naive.npy")
                row["naive"] = naive
                row["identical"] = bool(np.array_equal(np.load(Path(tmp) / "ours.npy"), np.load(Path(tmp) / "naive.npy")))
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
            write_report(rows, args.out)  # after every size, so a long run leaves its finished rows behind
    print(args.out.with_suffix(".md").read_text())


def write_report(rows: list, out: Path) -> None:
    """Fill naive-time extrapolations (∝ N², from the largest naive run) and write out.json / out.md."""
    measured = [r for r in rows if r["naive"]]
    if measured:
        ref = max(measured, key=lambda r: r["n"])
        for r in rows:
            if not r["naive"]:
                r["naive_seconds_extrapolated"] = ref["naive"]["seconds"] * (r["n"] / ref["n"]) ** 2
    report = {"benchmark": "principal scene components", "machine": machine(), "rows": sorted(rows, key=lambda r: r["n"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Principal scene components: ours vs naive greedy cover",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU, torch {m['torch']} "
        f"({m['torch_threads']} threads). {m['note']}.",
        "",
        "Synthetic float16 memmap of upsampled patch features (bench/bench_psc.py). Memory = peak added during the call:",
        "anonymous memory (sampled) / RSS (includes memmap pages read).",
        "",
        "| N | d | θ | t | N/t | ours s | naive s | speed-up | ours MiB anon/RSS | naive MiB anon/RSS | same kept set |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        o, nv = r["ours"], r["naive"]
        if nv:
            naive_s, speed = f"{nv['seconds']:.1f}", f"{nv['seconds'] / o['seconds']:.1f}×"
            naive_mem = f"{nv['peak_anon_added_mib']:.0f} / {nv['peak_rss_added_mib']:.0f}"
        else:
            est = r["naive_seconds_extrapolated"]
            naive_s = f"~{est:.0f} (extrapolated N², not run)" if est else "not run"
            speed = f"~{est / o['seconds']:.0f}× (extrapolated)" if est else "-"
            naive_mem = "not run"
        same = {True: "yes", False: "NO", None: "-"}[r["identical"]]
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['threshold']} | {r['t']:,} | {r['reduction_ratio']:.0f} | {o['seconds']:.1f} | "
            f"{naive_s} | {speed} | {o['peak_anon_added_mib']:.0f} / {o['peak_rss_added_mib']:.0f} | {naive_mem} | {same} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
