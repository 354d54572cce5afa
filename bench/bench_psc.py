"""PSC benchmark: our exact Algorithm 1 against the plain blockwise float64 form, same run, same inputs.

The plain form: normalise every row in float64, then per chunk of 1000 rows one [1000, N] float64 similarity block and
the greedy walk row by row (numpy). Cases:
  demo     the trainer's PSC input on the demo scene (`m3 demo-scene --size demo`, m3-tinyvlm features, every
           psc_pixel_stride-th cell of every view, non-zero rows, θ from the training config); skipped if not cached;
  walk     8,000 × 128 unit rows of a random walk on the sphere (neighbourhoods chain), θ = 0.9;
  clusters N × 512 rows around 400 tight centres (default N = 1M), θ = 0.9.
Every chunk of the plain form costs the same [1000, N] product, so above --plain-max rows it runs only its first
--plain-chunks chunks, and its full time is estimated as normalisation (once) + the measured products scaled to all
chunks + the measured walk (not scaled: later chunks have fewer unused rows), a lower bound (marked in the table).
The demo case reads the scene given by --demo-scene, else the cached one ($M3_CACHE_DIR, default ~/.cache/m3_memory);
to build it (~5 min CPU):
  m3 demo-scene --size demo && m3 features $M3_CACHE_DIR/demo_scene/demo-seed0-v1 --model m3-tinyvlm
Each method runs in its own subprocess (peak RSS per method).

Usage: OMP_NUM_THREADS=2 python bench/bench_psc.py [--cases demo walk clusters] [--n 1000000] [--out bench/results/psc]
       [--demo-scene DIR] [--demo-npz FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, machine_info, write_report  # noqa: E402

from m3_memory.core.memory.psc import PSCConfig, principal_scene_components  # noqa: E402

PLAIN_CHUNK = 1000


def plain_psc(features: np.ndarray, threshold: float, max_chunks: int | None = None) -> tuple[np.ndarray, dict]:
    """The plain blockwise float64 greedy cover: kept row indices [t] (of the first max_chunks chunks if given) and
    timings {setup_s: normalisation, product_s: the [chunk, N] products, walk_s: the row-by-row walk, chunks}."""
    t0 = time.perf_counter()
    unit = np.array(features, dtype=np.float64)  # one N × d float64 copy, normalised in place
    peak = np.abs(unit).max(axis=1, keepdims=True)
    valid = peak[:, 0] > 0
    unit *= 2.0 ** -np.frexp(np.where(valid[:, None], peak, 1.0))[1]
    unit /= np.where(valid, np.linalg.norm(unit, axis=1), 1.0)[:, None]
    used = ~valid
    kept = []
    timing = {"setup_s": time.perf_counter() - t0, "product_s": 0.0, "walk_s": 0.0, "chunks": 0}
    for c, start in enumerate(range(0, len(unit), PLAIN_CHUNK)):
        if max_chunks is not None and c == max_chunks:
            break
        t0 = time.perf_counter()
        sims = unit[start:start + PLAIN_CHUNK] @ unit.T
        t1 = time.perf_counter()
        for j in range(start, min(start + PLAIN_CHUNK, len(unit))):
            if used[j]:
                continue
            similar = (sims[j - start] >= threshold) & valid
            if not used[similar].any():
                kept.append(j)
                used[similar] = True
        timing["product_s"] += t1 - t0
        timing["walk_s"] += time.perf_counter() - t1
        timing["chunks"] += 1
    return np.array(kept, dtype=np.int64), timing


def demo_input(saved: Path | None, scene_dir: Path | None = None) -> tuple[np.ndarray, float, int] | None:
    """demo_rows(scene_dir), read from / written to the .npz `saved` when given (reruns skip the feature stack)."""
    if saved is not None and saved.exists():
        with np.load(saved) as z:
            return z["rows"], float(z["threshold"]), int(z["chunk"])
    demo = demo_rows(scene_dir)
    if demo is not None and saved is not None:
        np.savez(saved, rows=demo[0], threshold=demo[1], chunk=demo[2])
    return demo


def demo_rows(scene_dir: Path | None = None) -> tuple[np.ndarray, float, int] | None:
    """The trainer's PSC input on scene_dir (default: the cached demo scene) with its m3-tinyvlm features:
    rows [N, 128] float32, θ, chunk; None if the features are not cached."""
    from m3_memory.core.pipeline import load_train_config, scene_features
    from m3_memory.core.scene import Scene
    from m3_memory.core.trainer import psc_input
    from m3_memory.sim.demo import GENERATOR_VERSION, cache_dir

    if scene_dir is None:
        scene_dir = cache_dir() / "demo_scene" / f"demo-seed0-v{GENERATOR_VERSION}"
    if not (scene_dir / "features").is_dir():
        return None
    config = load_train_config(None, {})
    features = scene_features(Scene.load(scene_dir), scene_dir, ["m3-tinyvlm"])["m3-tinyvlm"]
    rows, psc = psc_input("m3-tinyvlm", features, config)
    return rows, psc.threshold, psc.chunk


def sphere_walk(n: int, d: int, step: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = step / np.sqrt(d) * rng.standard_normal((n, d))
    rows = np.empty((n, d))
    x = rng.standard_normal(d)
    for i in range(n):
        x /= np.linalg.norm(x)
        rows[i] = x
        x = x + steps[i]
    return rows.astype(np.float32)


def clusters(n: int, d: int, k: int = 400, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(s + 100_000, n)
        out[s:e] = centres[rng.integers(0, k, e - s)] + noise * rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def worker(method: str, path: str, threshold: float, chunk: int, max_chunks: int | None, out_npy: str) -> dict:
    features = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    if method == "ours":
        kept = principal_scene_components(features, PSCConfig(threshold, chunk=chunk)).indices.numpy()
        timing = {}
    else:
        kept, timing = plain_psc(features, threshold, max_chunks)
    seconds = time.perf_counter() - t0
    np.save(out_npy, kept)
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "t": int(kept.size), **timing}


def run_worker(method, path, threshold, chunk, max_chunks, out_npy) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--path", str(path), "--threshold", str(threshold),
           "--chunk", str(chunk), "--out-npy", str(out_npy)] + (["--max-chunks", str(max_chunks)] if max_chunks else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["demo", "walk", "clusters"])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows of the clusters case")
    ap.add_argument("--plain-max", type=int, default=100_000, help="above this many rows the plain form is sampled")
    ap.add_argument("--plain-chunks", type=int, default=10, help="chunks of the plain form run when sampled")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "psc")
    ap.add_argument("--demo-npz", type=Path, help="the demo case's input, saved here on first use and read after")
    ap.add_argument("--demo-scene", type=Path, help="scene directory of the demo case (default: the cached demo scene)")
    ap.add_argument("--worker")
    ap.add_argument("--path")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--chunk", type=int)
    ap.add_argument("--max-chunks", type=int)
    ap.add_argument("--out-npy")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.threshold, args.chunk, args.max_chunks, args.out_npy)))
        return

    info = machine_info()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            if case == "demo":
                demo = demo_input(args.demo_npz, args.demo_scene)
                if demo is None:
                    print("demo: scene or features not cached, skipped (see the docstring to build them)", flush=True)
                    continue
                rows, threshold, chunk = demo
            elif case == "walk":
                rows, threshold, chunk = sphere_walk(8000, 128, step=0.1), 0.9, 2048
            else:
                rows, threshold, chunk = clusters(args.n, 512), 0.9, 2048
            path = Path(tmp) / f"{case}.npy"
            np.save(path, rows)
            n, d = rows.shape
            del rows
            ours = run_worker("ours", path, threshold, chunk, None, Path(tmp) / "ours.npy")
            n_chunks = -(-n // PLAIN_CHUNK)
            sampled = args.plain_chunks if n > args.plain_max and args.plain_chunks < n_chunks else None
            plain = run_worker("plain", path, threshold, chunk, sampled, Path(tmp) / "plain.npy")
            kept_ours, kept_plain = np.load(Path(tmp) / "ours.npy"), np.load(Path(tmp) / "plain.npy")
            if sampled:  # compare the kept rows of the chunks the plain form walked
                kept_ours = kept_ours[kept_ours < sampled * PLAIN_CHUNK]
            row = {"case": case, "n": n, "d": d, "threshold": threshold, "t": ours["t"], "ours": ours, "plain": plain,
                   "plain_chunks_run": sampled or n_chunks, "plain_chunks_total": n_chunks,
                   "plain_seconds_full": plain_full_seconds(plain, n_chunks),
                   "identical": bool(np.array_equal(kept_ours, kept_plain))}
            row["speedup"] = row["plain_seconds_full"] / ours["seconds"]
            results.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
            info["load_average_at_end"] = os.getloadavg()  # written after every case: a long run keeps what finished
            write_report(args.out, {"benchmark": "principal scene components", "machine": info, "rows": results},
                         markdown(info, results))


def plain_full_seconds(plain: dict, n_chunks: int) -> float:
    """The plain form's time over all n_chunks chunks from a run over its first plain["chunks"]: normalisation once,
    every chunk's [chunk, N] product (the same size for every chunk) scaled up, and the row walk as measured. The walk
    of the remaining chunks is left out (it only shrinks as rows get used), so this is a lower bound."""
    return plain["setup_s"] + plain["product_s"] * n_chunks / plain["chunks"] + plain["walk_s"]


def markdown(info: dict, rows: list) -> str:
    lines = [
        "# Principal scene components: ours vs the plain blockwise float64 form",
        "",
        f"Machine: {describe(info)}; load average at end {tuple(round(x, 2) for x in info['load_average_at_end'])}.",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python bench/bench_psc.py "
        f"{' '.join(sys.argv[1:])}` (cases: bench/bench_psc.py docstring).",
        "Same kept set: for a sampled plain run, over the rows of the chunks it walked (a prefix of the walk is exact).",
        "",
        "| case | N | d | θ | t | ours s | plain s | speed-up | ours peak RSS MiB | plain peak RSS MiB | same kept set |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, p = r["ours"], r["plain"]
        if r["plain_chunks_run"] < r["plain_chunks_total"]:
            plain_s = (f"≥ {r['plain_seconds_full']:.0f} (extrapolated: ran {r['plain_chunks_run']} of "
                       f"{r['plain_chunks_total']} chunks in {p['seconds']:.1f} s, of which normalisation "
                       f"{p['setup_s']:.1f} s, products {p['product_s']:.1f} s, walk {p['walk_s']:.1f} s)")
            speed = f"≥ {r['speedup']:.0f}× (extrapolated)"
        else:
            plain_s, speed = f"{p['seconds']:.2f}", f"{r['speedup']:.1f}×"
        same = "yes" if r["identical"] else "NO"
        lines.append(f"| {r['case']} | {r['n']:,} | {r['d']} | {r['threshold']} | {r['t']:,} | {o['seconds']:.2f} | "
                     f"{plain_s} | {speed} | {o['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
