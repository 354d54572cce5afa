"""End-to-end benchmark of the engine: train a memory on the demo scene with the default settings
(config/train.yaml), then locate every scripted object and measure the 3D error against ground truth.

    python bench/bench_train.py                              # CPU (or CUDA when present) -> bench/results/train_<device>
    python bench/bench_train.py --device cuda --scene DIR    # a GPU machine: scene generated elsewhere
    python bench/bench_train.py --set iterations=1000        # any training setting

Reports training wall time and s/iteration, Gaussians, parameters, PSC bank sizes, training PSNR, and per object the
rendered locate error and the direct 3D (per-Gaussian) error, success within 5 cm, and locate latency (mean / p95).
`--texts FILE` reads the query embeddings from FILE when it exists and writes them there otherwise, so a machine without
the text model's package (a GPU box with no registry access) can run the benchmark on embeddings made elsewhere.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine import describe, machine_info, write_report  # bench/machine.py (scripts run from bench/ on sys.path)
from texts import TextCache  # bench/texts.py
from m3_memory.core.checkpoint import Memory
from m3_memory.core.pipeline import load_train_config, parse_overrides, scene_features
from m3_memory.core.engine import QueryEngine, QueryOptions
from m3_memory.core.query import CANONICAL_NEGATIVES
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import resolve_device, train

RESULTS = Path(__file__).parent / "results"
SUCCESS_M = 0.05
LATENCY_REPEATS = 3
SEARCH_VIEWS = 4  # as the memory server searches when a request has no view (m3_bringup/config/memory_server.yaml)


def scripted_objects(scene_dir: Path) -> list[dict]:
    """The demo's ground truth: name, primary phrase and centre `[3]` of every object."""
    data = json.loads((scene_dir / "objects.json").read_text())
    objects = data["objects"] if isinstance(data, dict) else data
    return [{"name": o["name"], "query": o["phrases"][0], "truth": np.asarray(o["center"], dtype=float)} for o in objects]


def locate_objects(memory: Memory, model: str, objects: list[dict], texts: TextCache) -> list[dict]:
    """The answer (the direct 3D target, as the memory server gives it without a camera view) and what the rendered
    search alone found, for every object, with their errors and locate latencies (ms)."""
    rows = []
    engine = QueryEngine(memory, model, texts)
    options = QueryOptions(max_search_views=SEARCH_VIEWS)
    for obj in objects:
        text = texts([obj["query"]])[0]
        latencies = []
        for _ in range(LATENCY_REPEATS):
            started = time.perf_counter()
            answer = engine.answer(obj["query"], None, options, text=text)
            latencies.append(1e3 * (time.perf_counter() - started))
        error = float(np.linalg.norm(answer.point - obj["truth"]))
        rendered = None if answer.rendered_point is None else float(np.linalg.norm(answer.rendered_point - obj["truth"]))
        rows.append({"name": obj["name"], "query": obj["query"], "target": answer.point.round(4).tolist(),
                     "truth": obj["truth"].round(4).tolist(), "error_m": round(error, 4), "success": error <= SUCCESS_M,
                     "rendered_error_m": None if rendered is None else round(rendered, 4),
                     "locate_ms": [round(x, 1) for x in latencies]})
    return rows


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"# Training + locate on the demo scene ({report['device']})", "",
        f"Machine: {describe(report['machine'])}.", "",
        f"Settings: config/train.yaml with overrides {report['overrides'] or 'none'}; feature model {report['model']}.",
        "",
        f"Training: {s['iterations']} iterations in {s['train_s']:.0f} s ({1e3 * s['train_s'] / s['iterations']:.0f} ms/it;"
        f" features {s['features_s']:.1f} s before it), {s['gaussians']:,} Gaussians, {s['parameters']:,} parameters,"
        f" banks {s['bank_sizes']}, training PSNR {s['psnr']:.2f} dB.", "",
        f"Locate (rendered from up to {SEARCH_VIEWS} of the {s['views']} training views that see the direct 3D answer, as"
        f" the memory server searches without a camera view): success within 5 cm {s['successes']}/{s['objects']},"
        f" latency mean {s['locate_ms_mean']:.0f} ms, p95 {s['locate_ms_p95']:.0f} ms.", "",
        "| object | query | error (answer: direct 3D) | error (rendered search alone) | within 5 cm |",
        "|---|---|---:|---:|:---:|",
    ]
    for row in report["objects"]:
        rendered = "none" if row["rendered_error_m"] is None else f"{100 * row['rendered_error_m']:.1f} cm"
        lines.append(f"| {row['name']} | {row['query']} | {100 * row['error_m']:.1f} cm | {rendered} | "
                     f"{'yes' if row['success'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=None, help="scene directory (default: the demo scene, cached)")
    parser.add_argument("--model", default="m3-tinyvlm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="training overrides")
    parser.add_argument("--texts", type=Path, default=None, help="query-embedding cache (read if present, else written)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="keep the trained memory here")
    parser.add_argument("--out", type=Path, default=None, help="results basename (default bench/results/train_<device>)")
    args = parser.parse_args()

    if args.scene is None:
        from m3_memory.sim.demo import demo_scene

        args.scene = demo_scene("demo")
    device = resolve_device(args.device)
    machine = machine_info(str(device))
    overrides = {**parse_overrides(args.set), "device": str(device)}
    config = load_train_config(None, overrides)
    scene = Scene.load(args.scene)
    objects = scripted_objects(args.scene)
    texts = TextCache(args.model, args.texts)
    # before training, so a missing text model fails at once; the engine also encodes the canonical negatives, which
    # must be in the cache for a machine without the text model (--texts)
    texts([o["query"] for o in objects] + list(CANONICAL_NEGATIVES))

    started = time.monotonic()
    features = scene_features(scene, args.scene, [args.model])
    features_s = time.monotonic() - started
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or Path(tmp) / "memory.pt"
        started = time.monotonic()
        memory = train(scene, features, config, checkpoint)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.monotonic() - started
    rows = locate_objects(memory, args.model, objects, texts)
    latencies = [x for row in rows for x in row["locate_ms"]]
    summary = {
        "iterations": config.iterations, "train_s": round(train_s, 1), "features_s": round(features_s, 1),
        "gaussians": len(memory.gaussians), "parameters": memory.num_parameters(), "bank_sizes": memory.bank_sizes(),
        "psnr": round(memory.config["final"]["psnr"], 2), "views": len(memory.views), "objects": len(rows),
        "successes": sum(row["success"] for row in rows), "locate_ms_mean": round(float(np.mean(latencies)), 1),
        "locate_ms_p95": round(float(np.percentile(latencies, 95)), 1),
    }
    report = {"device": str(device), "model": args.model, "overrides": args.set, "scene": str(args.scene),
              "machine": machine, "summary": summary, "objects": rows}
    write_report(args.out or RESULTS / f"train_{device.type}", report, markdown(report))

if __name__ == "__main__":
    main()
