"""Text-query latency and accuracy: the query engine against the query path it replaced, in the same run.

    python bench/bench_locate.py --memory MEMORY.pt --scene SCENE [--texts CACHE.pt] [--repeats 5]

The baseline is the code of commit BASELINE (`m3_memory/core/locate.py` and `query.py`, read from git and loaded as a
module): `locate_in_memory` (the memory server without a camera view, 4 views) and `locate` from one camera view, which
decode every rendered pixel through the bank. The engine decodes the Gaussians once when it is built and blends the
per-Gaussian scores into its views (`render="scores"`); the paper's per-pixel path (`render="features"`) is measured too.
Every object of the scene's objects.json is asked by its first phrase; each camera-view query looks from the training
view nearest the object that has it in frame. Text embeddings are computed before timing (as the server keeps its
encoder loaded), so the figures are the query's own work.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine_info, write_report  # bench/machine.py  # noqa: E402
from texts import TextCache  # noqa: E402

from m3_memory.core.checkpoint import load_memory  # noqa: E402
from m3_memory.core.engine import QueryEngine, QueryOptions  # noqa: E402
from m3_memory.core.query import CANONICAL_NEGATIVES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BASELINE = "c2470cb"   # the last commit before the query engine
SUCCESS_M = 0.05


def load_baseline(tmp: Path):
    """The baseline's locate module, its `query` import pointed at the baseline's own query.py."""
    for name in ("locate", "query"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE}:m3_memory/core/{name}.py"],
                                capture_output=True, text=True, check=True).stdout
        source = source.replace("from m3_memory.core.query import", "from baseline_query import")
        (tmp / f"baseline_{name}.py").write_text(source)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("baseline_locate", tmp / "baseline_locate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_locate"] = module   # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


class BaselineMemory:
    """The memory as the baseline read it: training views as a dict."""

    def __init__(self, memory):
        self.__dict__.update(vars(memory))
        views = memory.views
        self.views = {"c2w": views.c2w, "K": views.K, "width": views.width, "height": views.height}
        self.models = memory.models


def timed(call, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(1e3 * (time.perf_counter() - started))
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--scene", type=Path, required=True, help="the scene directory (objects.json)")
    parser.add_argument("--texts", type=Path, default=None, help="query-embedding cache (read if present, else written)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    memory, _ = load_memory(args.memory)
    device = str(memory.gaussians.params["means"].device)
    model = memory.models[0]
    objects = json.loads((args.scene / "objects.json").read_text())["objects"]
    phrases = [o["phrases"][0] for o in objects]
    texts = TextCache(model, args.texts)
    embeddings = texts(phrases + list(CANONICAL_NEGATIVES))
    started = time.perf_counter()
    engine = QueryEngine(memory, model, texts)
    build_s = time.perf_counter() - started
    views = memory.views

    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(Path(tmp))
        old_memory = BaselineMemory(memory)
        rows = []
        for j, obj in enumerate(objects):
            text, center = embeddings[j], np.asarray(obj["center"])
            seen = np.flatnonzero(engine.seen_by(center))
            view = int(seen[np.argmin(np.linalg.norm(views.c2w[seen, :3, 3] - center, axis=1))])
            camera = views.camera(view)
            row = {"query": phrases[j], "view": view}
            cases = {
                "baseline_memory": lambda: baseline.locate_in_memory(old_memory, text, model=model, max_views=4).result,
                "engine_memory": lambda: engine.answer(phrases[j], None, QueryOptions(), text=text),
                "engine_memory_features": lambda: engine.answer(phrases[j], None, QueryOptions(render="features"),
                                                                text=text),
                "baseline_view": lambda: baseline.locate(old_memory, text, camera.c2w[None], camera.K[None],
                                                         camera.width, camera.height, model=model),
                "engine_view": lambda: engine.answer(phrases[j], camera, QueryOptions(), text=text),
                "engine_view_features": lambda: engine.answer(phrases[j], camera, QueryOptions(render="features"),
                                                              text=text),
            }
            for name, call in cases.items():
                call()   # warm-up
                times, result = timed(call, args.repeats)
                row[name] = {"ms": [round(t, 1) for t in times],
                             "error_m": round(float(np.linalg.norm(result.point - center)), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = {}
    for name in rows[0]:
        if name in ("query", "view"):
            continue
        ms = [t for row in rows for t in row[name]["ms"]]
        errors = [row[name]["error_m"] for row in rows]
        summary[name] = {"ms_mean": round(float(np.mean(ms)), 1), "ms_p95": round(float(np.percentile(ms, 95)), 1),
                         "within_5cm": int(sum(e <= SUCCESS_M for e in errors)), "objects": len(errors)}
    report = {"machine": machine_info(device), "memory": str(args.memory), "gaussians": len(memory.gaussians),
              "bank_sizes": memory.bank_sizes(), "engine_build_s": round(build_s, 2), "baseline": BASELINE,
              "repeats": args.repeats, "summary": summary, "objects": rows}
    write_report(args.out or RESULTS / f"locate_{device.split(':')[0]}", report, markdown(report))


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Text-query latency: the query engine vs the path it replaced ({BASELINE})", "",
             f"Machine: {describe(report['machine'])}.", "",
             f"Memory: {report['memory']}, {report['gaussians']:,} Gaussians, banks {report['bank_sizes']}; engine "
             f"built in {report['engine_build_s']} s (text encoder + decoding every Gaussian once). "
             f"{report['repeats']} timed runs per object after a warm-up; text embeddings precomputed.", "",
             "| path | mean ms | p95 ms | p95 ratio to baseline | within 5 cm |", "|---|---:|---:|---:|---:|"]
    for name, base in (("baseline_memory", "baseline_memory"), ("engine_memory", "baseline_memory"),
                       ("engine_memory_features", "baseline_memory"), ("baseline_view", "baseline_view"),
                       ("engine_view", "baseline_view"), ("engine_view_features", "baseline_view")):
        ratio = s[base]["ms_p95"] / s[name]["ms_p95"]
        lines.append(f"| {name} | {s[name]['ms_mean']:.0f} | {s[name]['ms_p95']:.0f} | {ratio:.1f}× faster | "
                     f"{s[name]['within_5cm']}/{s[name]['objects']} |")
    lines += ["", "`*_memory`: no camera view (whole memory, 4 training views rendered); `*_view`: one camera view "
              "(the training view nearest the object). `_features`: the paper's render → decode per pixel path.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
