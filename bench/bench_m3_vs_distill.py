"""M3 vs feature distillation (F-3DGS / Feature Splatting style) on the demo scene, as the paper's Tables 1-2.

Both are trained with the same TrainConfig (config/train.yaml, `holdout_every` 8: views 0, 8, 16, ... held out), the
same features, views, iterations, RGB loss and sampled-pixel feature loss; they differ only in how the rendered latent
becomes a d-dim feature (M3: each model's 16-dim query slice, memory attention over its fixed PSC bank; baseline, the
paper's F-3DGS protocol: one latent of M3's total query size, Σ l over the models, shared by all models, and a learned
latent → hidden → d MLP per model reading all of it; `m3_memory.core.distill`).
Both are then evaluated by `m3_memory.core.eval.evaluate` on the held-out views. Training seconds are the trainers' own
loop times (`config.final.train_s`); the caller's wall time (with PSC and initialisation) is reported beside them.

Usage: python bench/bench_m3_vs_distill.py [--scene DIR | --size demo] [--iterations N] [--models m3-tinyvlm]
       [--decoder-hidden 64] [--out bench/results/m3_vs_distill]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from machine import describe, machine_info, write_report  # bench/machine.py (scripts run from bench/ on sys.path)
from texts import TextCache  # bench/texts.py
from m3_memory.core.pipeline import load_train_config, scene_features
from m3_memory.core.distill import DecoderConfig, train_distilled
from m3_memory.core.eval import DISTRACTOR_CAPTIONS, evaluate
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import resolve_device, train


def run_method(name: str, scene: Scene, features: dict, config, checkpoint: Path, decoder: DecoderConfig,
               texts: dict | None) -> dict:
    """Train one method, evaluate it on the held-out views; its report plus the caller's wall seconds."""
    started = time.monotonic()
    if name == "m3":
        memory = train(scene, features, config, checkpoint)
    else:
        memory = train_distilled(scene, features, config, checkpoint, decoder)
    wall = time.monotonic() - started
    print(f"{name}: trained in {wall:.0f} s ({len(memory.gaussians):,} Gaussians), evaluating", flush=True)
    report = evaluate(scene, memory, features, texts)
    report["cost"]["train_wall_s"] = wall
    return report


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(reports: dict[str, dict]) -> list[str]:
    """One Markdown row per (model, method)."""
    lines = ["| model | method | cos dist ↓ | L2 ↓ | PSNR | mIoU | cIoU | P@0.5 | I2T R@1/5/10 | T2I R@1/5/10 "
             "| 3D ≤ 5 cm (rendered / direct) | params | train s | render ms | locate ms (mean / p95) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    models = next(iter(reports.values()))["features"]
    for model in models:
        for method, r in reports.items():
            f, g, c = r["features"][model], r["grounding"].get(model, {}), r["cost"]
            ret = r["retrieval"].get(model, {}).get("rendered")
            loc = r["localisation"].get(model)
            recalls = {way: "-" if ret is None else " / ".join(f"{v:.2f}" for v in ret[way].values())
                       for way in ("i2t", "t2i")}
            success = "-" if loc is None else (f"{loc['rendered']['success_rate']:.2f} / "
                                               f"{loc['direct_3d']['success_rate']:.2f}")
            lines.append(
                f"| {model} | {method} | {fmt(f.get('cosine_distance'))} | {fmt(f.get('l2'))} "
                f"| {r['rgb']['psnr']:.2f} | {fmt(g.get('miou'))} | {fmt(g.get('ciou'))} | {fmt(g.get('p50'))} "
                f"| {recalls['i2t']} | {recalls['t2i']} | {success} | {c['parameters']:,} "
                f"| {c['train_s']:.0f} ({c['train_wall_s']:.0f} wall) | {c['render_ms_mean']:.0f} "
                f"| {fmt(c['locate_ms_mean'], '.0f')} / {fmt(c['locate_ms_p95'], '.0f')} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", type=Path, default=None, help="scene directory (default: the generated demo scene)")
    ap.add_argument("--size", default="demo", help="demo scene size when --scene is not given (demo or tiny)")
    ap.add_argument("--config", type=Path, default=None, help="training YAML (default config/train.yaml)")
    ap.add_argument("--iterations", type=int, default=None, help="override the config's iterations")
    ap.add_argument("--holdout-every", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["m3-tinyvlm"])
    ap.add_argument("--decoder-hidden", type=int, default=DecoderConfig.hidden, help="baseline MLP width")
    ap.add_argument("--texts", type=Path, default=None,
                    help="query-embedding cache: read where present, else computed and written (bench/texts.py)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "m3_vs_distill")
    args = ap.parse_args()

    if args.scene is None:
        from m3_memory.sim import demo_scene  # pybullet + rosbags: only where the scene is generated

        args.scene = demo_scene(args.size, progress=lambda line: print(line, flush=True))
    scene_dir = args.scene
    scene = Scene.load(scene_dir)
    overrides = {"holdout_every": args.holdout_every}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    config = load_train_config(args.config, overrides)
    m = machine_info(str(resolve_device(config.device)))
    features = scene_features(scene, scene_dir, args.models)
    decoder = DecoderConfig(hidden=args.decoder_hidden)
    texts = {model: TextCache(model, args.texts) for model in args.models} if args.texts else None
    reports = {}
    with tempfile.TemporaryDirectory(prefix="m3-vs-distill-") as tmp:
        for method in ("m3", "distill"):
            reports[method] = run_method(method, scene, features, config, Path(tmp) / f"{method}.pt", decoder, texts)

    ratio = reports["distill"]["cost"]["parameters"] / reports["m3"]["cost"]["parameters"]
    report = {"benchmark": "M3 vs feature distillation, held-out views", "machine": m, "scene": str(scene_dir),
              "iterations": config.iterations, "holdout_every": config.holdout_every, "models": args.models,
              "decoder_hidden": args.decoder_hidden, "distill_to_m3_parameters": ratio, "reports": reports}
    views = reports["m3"]["views"]
    budget = "larger" if ratio > 1 else "smaller" if ratio < 1 else "equal"
    lines = [
        "# M3 vs feature distillation (F-3DGS style) on held-out views",
        "",
        f"Machine: {describe(m)}; device {reports['m3']['cost']['device']}, load average at the end "
        f"{[round(x, 2) for x in os.getloadavg()]}.",
        "",
        f"Scene {scene_dir} ({views['size'][0]}x{views['size'][1]}, {views['total']} views, "
        f"{len(views['evaluated'])} held out: every {config.holdout_every}th), {config.iterations} iterations each, "
        f"M3: l = {config.query_dim} per model; baseline (paper's F-3DGS protocol): one shared latent of "
        f"{config.query_dim * len(args.models)} (M3's total query size), decoder latent → {args.decoder_hidden} → d "
        f"per model. The baseline has "
        f"{ratio:.2f}× M3's parameters ({budget} budget).",
        "",
    ] + table(reports) + [
        "",
        "Cosine distance and L2: decoded rendered vs raw features of the held-out views (lower is better). Grounding: "
        "each visible object's primary phrase, Otsu mask vs ground truth. Retrieval: object regions vs object phrases "
        f"+ {len(DISTRACTOR_CAPTIONS)} distractor captions. 3D: the rendered search of 4 training views alone / the "
        "direct 3D answer (the memory server's target), success within 5 cm of the ground-truth centre. Train s: the "
        "training loop (caller wall time incl. PSC in brackets).",
    ]
    write_report(args.out, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
