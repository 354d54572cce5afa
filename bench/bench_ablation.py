"""Fidelity ablation of M3 against the distillation baseline on the demo scene's held-out views (issue #18, part 2).

One training run per row, every row with the same iterations, views (`holdout_every` 8: views 0, 8, 16, ... held out),
seed and config/train.yaml; each row changes one thing against "M3 default":
- distill: the F-3DGS baseline of the paper's protocol (`m3_memory.core.distill`: one latent of Σ query_dim shared by
  all models, one MLP decoder per model reading all of it);
- learnable vs fixed Wm; Wm's start (seeded random as the authors', or the bank's principal directions); τ; θ
  (Algorithm 1's threshold, hence the bank size); query dims; top-k sparse vs dense softmax;
- two models at once (m3-tinyvlm + m3-tinyvlm-regions), for M3 and for distillation;
- the bank ceiling (no training): the cosine distance / L2 on the held-out views if each pixel took the bank row nearest
  to it in cosine, per θ: what no query can beat with a one-hot attention;
- the decoder ceiling (no Gaussians): the memory attention of the row's settings decoding a free query per held-out
  feature cell (2000 seeded cells; queries, and Wm when learnable, fitted by Adam to those very cells with the training
  loss): the best any rendered query could decode through that decoder, i.e. what Wm, τ, top-k and l allow.
Feature fidelity (cosine distance, L2) and RGB PSNR come from `m3_memory.core.eval.evaluate` without text queries
(grounding, retrieval and localisation skipped). A bank (Algorithm 1 over the training views) is computed once per
(model, θ) and shared by the rows that use it; its seconds are reported in the notes, not in "train s".

Results are written after every row (`--out`.json/.md); a rerun with the same `--out` skips the rows already there.

Usage: python bench/bench_ablation.py [--scene /tmp/rs_demo] [--iterations 500] [--rows NAME ...] [--list]
       [--out bench/results/ablation_cpu]
The scene must have the features of every model in its cache (`m3 features SCENE --model NAME`) or be writable.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from machine import describe, machine_info, write_report  # bench/machine.py (scripts run from bench/ on sys.path)
from m3_memory.core.distill import DecoderConfig, train_distilled
from m3_memory.core.eval import evaluate, feature_fidelity, held_out_views
from m3_memory.core.losses import feature_loss
from m3_memory.core.memory import MemoryAttention, principal_scene_components
from m3_memory.core.pipeline import load_train_config, merge, scene_features
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import build_attention, psc_input, resolve_device, train, training_views

BASE = "m3-tinyvlm"
REGIONS = "m3-tinyvlm-regions"


@dataclass
class Row:
    name: str
    method: str                       # "m3", "distill", "ceiling" (bank) or "decoder" (decoder ceiling)
    models: tuple[str, ...] = (BASE,)
    overrides: dict = field(default_factory=dict)   # TrainConfig settings over config/train.yaml
    hidden: int = DecoderConfig.hidden                # the distillation MLP's width
    wm_init: str = "random"           # MemoryAttention's Wm start ("principal": the bank's leading singular directions)


def theta(value: float) -> dict:
    return {"psc": {BASE: {"threshold": value}}}


ROWS = [
    Row("M3 default", "m3"),
    Row("distill (paper protocol)", "distill"),
    Row("bank ceiling θ 0.95 (default)", "ceiling"),
    Row("bank ceiling θ 0.9", "ceiling", overrides=theta(0.9)),
    Row("bank ceiling θ 0.98", "ceiling", overrides=theta(0.98)),
    Row("bank ceiling θ 0.99", "ceiling", overrides=theta(0.99)),
    Row("decoder ceiling default", "decoder"),
    Row("decoder ceiling τ 0.02", "decoder", overrides={"temperature": 0.02}),
    Row("decoder ceiling τ 0.1", "decoder", overrides={"temperature": 0.1}),
    Row("decoder ceiling learnable Wm", "decoder", overrides={"learnable_wm": True}),
    Row("decoder ceiling top-k 8", "decoder", overrides={"top_k": 8}),
    Row("decoder ceiling query dim 8", "decoder", overrides={"query_dim": 8}),
    Row("decoder ceiling query dim 32", "decoder", overrides={"query_dim": 32}),
    Row("M3 learnable Wm", "m3", overrides={"learnable_wm": True}),
    # hidden 640: its MLP (16·640 + 640 + 640·128 + 128 = 92,928) outweighs M3's bank + Wm (650·128 + 16·128)
    Row("distill hidden 640 (≥ M3's budget)", "distill", hidden=640),
    Row("M3 τ 0.02", "m3", overrides={"temperature": 0.02}),
    Row("M3 top-k 8", "m3", overrides={"top_k": 8}),
    Row("M3 two models", "m3", (BASE, REGIONS)),
    Row("distill two models", "distill", (BASE, REGIONS)),
    Row("M3 learnable Wm, τ 0.02", "m3", overrides={"learnable_wm": True, "temperature": 0.02}),
    Row("M3 query dim 32", "m3", overrides={"query_dim": 32}),
    Row("M3 θ 0.98", "m3", overrides=theta(0.98)),
    Row("M3 query dim 8", "m3", overrides={"query_dim": 8}),
    Row("M3 τ 0.1", "m3", overrides={"temperature": 0.1}),
    Row("M3 θ 0.9", "m3", overrides=theta(0.9)),
    Row("distill latent 8", "distill", overrides={"query_dim": 8}),
    Row("distill latent 32", "distill", overrides={"query_dim": 32}),
    Row("bank ceiling two models", "ceiling", (BASE, REGIONS)),
    Row("M3 learnable Wm, τ 0.1", "m3", overrides={"learnable_wm": True, "temperature": 0.1}),
    Row("M3 θ 0.99", "m3", overrides=theta(0.99)),
    # sharper selection and smaller banks on top of the best row so far (learnable Wm, τ 0.02)
    Row("decoder ceiling learnable Wm, τ 0.02", "decoder", overrides={"learnable_wm": True, "temperature": 0.02}),
    Row("decoder ceiling learnable Wm, τ 0.01", "decoder", overrides={"learnable_wm": True, "temperature": 0.01}),
    Row("bank ceiling θ 0.93", "ceiling", overrides=theta(0.93)),
    Row("M3 learnable Wm, τ 0.01", "m3", overrides={"learnable_wm": True, "temperature": 0.01}),
    Row("M3 learnable Wm, τ 0.02, top-k 8", "m3", overrides={"learnable_wm": True, "temperature": 0.02, "top_k": 8}),
    Row("M3 learnable Wm, τ 0.02, θ 0.9", "m3", overrides={"learnable_wm": True, "temperature": 0.02, **theta(0.9)}),
    Row("M3 learnable Wm, τ 0.02, θ 0.93", "m3",
        overrides={"learnable_wm": True, "temperature": 0.02, **theta(0.93)}),
    Row("decoder ceiling principal Wm", "decoder", wm_init="principal"),
    Row("M3 principal Wm", "m3", wm_init="principal"),
    Row("M3 principal Wm, τ 0.02", "m3", overrides={"temperature": 0.02}, wm_init="principal"),
    Row("M3 learnable principal Wm, τ 0.02", "m3", overrides={"learnable_wm": True, "temperature": 0.02},
        wm_init="principal"),
]


class Banks:
    """Algorithm 1's bank per (model, θ, training views), computed once; `seconds` per key."""

    def __init__(self, features: dict, device):
        self.features, self.device = features, device
        self.banks: dict[tuple, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}

    def get(self, model: str, config, views: np.ndarray) -> torch.Tensor:
        rows, psc_config = psc_input(model, self.features[model], config, views)
        key = (model, psc_config.threshold, config.psc_pixel_stride, tuple(views))
        if key not in self.banks:
            started = time.monotonic()
            self.banks[key] = principal_scene_components(torch.from_numpy(rows), psc_config,
                                                         device=self.device).components
            self.seconds[f"{model} θ {psc_config.threshold}"] = time.monotonic() - started
        return self.banks[key]


def bank_ceiling(features, bank: torch.Tensor, views: np.ndarray) -> dict:
    """Cosine distance and L2 over the non-zero feature cells of `views` (each cell stands for the same number of
    pixels) when each takes its cosine-nearest row of `bank: [t, d]`."""
    keys = F.normalize(bank.float().cpu(), dim=1)
    cos_sum = l2_sum = count = 0.0
    for view in views:
        raw = torch.from_numpy(np.asarray(features.maps[view], dtype=np.float32)).reshape(-1, keys.shape[1])
        raw = raw[raw.abs().sum(dim=1) > 0]
        for part in raw.split(4096):
            best, rows = (F.normalize(part, dim=1) @ keys.T).max(dim=1)
            cos_sum += float((1 - best).sum())
            l2_sum += float((bank.float().cpu()[rows] - part).norm(dim=1).sum())
            count += len(part)
    return {"cosine_distance": cos_sum / count, "l2": l2_sum / count, "cells": int(count)}


def decoder_ceiling(features, attention, views: np.ndarray, cells: int = 2000, steps: int = 300,
                    seed: int = 0) -> dict:
    """Feature fidelity of `attention` decoding one free query per sampled non-zero feature cell of `views`, the
    queries (and its learnable parameters) fitted to those cells by Adam on `feature_loss`."""
    d = attention.psc.shape[1]
    raw = torch.cat([torch.from_numpy(np.asarray(features.maps[v], dtype=np.float32)).reshape(-1, d) for v in views])
    raw = raw[raw.abs().sum(dim=1) > 0]
    generator = torch.Generator().manual_seed(seed)
    raw = raw[torch.randperm(len(raw), generator=generator)[:cells]].to(attention.psc.device)
    queries = (0.1 * torch.randn(len(raw), attention.wm.shape[0], generator=generator)).to(raw.device)
    queries.requires_grad_()
    optimizer = torch.optim.Adam([queries, *attention.parameters()], lr=0.05)
    for _ in range(steps):
        loss = feature_loss(attention(queries), raw)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        cosine, l2, count = feature_fidelity(attention(queries), raw)
    return {"cosine_distance": cosine, "l2": l2, "cells": count}


def row_attention(row: Row, model: str, features, config, device, views: np.ndarray, banks: Banks) -> MemoryAttention:
    """`build_attention` over the cached bank, Wm restarted as `row.wm_init` says (not a TrainConfig setting)."""
    attention = build_attention(model, features, config, device, views, components=banks.get(model, config, views))
    if row.wm_init != "random":
        with torch.no_grad():
            attention.wm.copy_(MemoryAttention(attention.wm.shape[0], attention.psc, wm_init=row.wm_init).wm)
    return attention


def run_row(row: Row, scene: Scene, features: dict, args, banks: Banks, device, tmp: Path) -> dict:
    config = load_train_config(args.config, merge({"iterations": args.iterations,
                                                   "holdout_every": args.holdout_every}, row.overrides))
    feats = {m: features[m] for m in row.models}
    views = training_views(len(scene), config.holdout_every)
    if row.method == "ceiling":
        held = held_out_views(len(scene), config.holdout_every)
        result = {"features": {}, "bank_sizes": {}}
        for model in row.models:
            bank = banks.get(model, config, views)
            result["features"][model] = bank_ceiling(feats[model], bank, held)
            result["bank_sizes"][model] = int(bank.shape[0])
        return result
    if row.method == "decoder":
        held = held_out_views(len(scene), config.holdout_every)
        result = {"features": {}, "bank_sizes": {}}
        for model in row.models:
            attention = row_attention(row, model, feats[model], config, device, views, banks)
            result["features"][model] = decoder_ceiling(feats[model], attention, held, seed=config.seed)
            result["bank_sizes"][model] = attention.bank_size
        return result

    def cached_banks(fs, train_views):
        return {m: row_attention(row, m, f, config, device, train_views, banks) for m, f in fs.items()}

    started = time.monotonic()
    path = tmp / "memory.pt"
    if row.method == "m3":
        memory = train(scene, feats, config, path, decoders=cached_banks)
    else:
        memory = train_distilled(scene, feats, config, path, DecoderConfig(hidden=row.hidden))
    wall = time.monotonic() - started
    report = evaluate(scene, memory, feats, text_encoders={})
    return {"features": report["features"], "psnr": report["rgb"]["psnr"], "bank_sizes": memory.bank_sizes(),
            "parameters": memory.num_parameters(), "gaussians": len(memory.gaussians),
            "train_s": memory.config["final"]["train_s"], "train_wall_s": wall,
            "final_feature_loss": memory.config["final"]["feat"]}


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    m, done = report["machine"], report["rows"]
    lines = [
        f"# Fidelity ablation: M3 vs the distillation baseline on held-out views ({'GPU' if 'gpu' in m else 'CPU'}, "
        f"{report['iterations']} iterations per row)", "",
        f"Machine: {describe(m)}; load average at the end {report.get('load_average_at_end')}. Other jobs shared the "
        "2 cores during the run: train seconds are indicative, fidelity is not affected by load.", "",
        "Commands (one run, resumed: rows already in the JSON were kept): "
        + "; ".join(f"`{c}`" for c in report["commands"]), "",
        f"Scene {report['scene']} (320x240, views held out: every {report['holdout_every']}th), "
        f"{report['iterations']} iterations per row, seed 0; one training run per row. Distillation follows the "
        "paper's F-3DGS protocol: one latent per Gaussian of Σ query_dim (M3's total query size) shared by all "
        "models, one latent → 64 → d MLP per model reading the whole latent (hidden 640 where the row says so).",
        "",
        "| row | model | cos dist ↓ | L2 ↓ | PSNR | bank size | params | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        r = done.get(row.name)
        if r is None:
            continue
        for model, f in r["features"].items():
            lines.append(f"| {row.name} | {model} | {fmt(f.get('cosine_distance'))} | {fmt(f.get('l2'))} "
                         f"| {fmt(r.get('psnr'), '.2f')} | {r['bank_sizes'].get(model, '-')} "
                         f"| {fmt(r.get('parameters'), ',')} | {fmt(r.get('train_s'), '.0f')} |")
    lines += ["", "Cosine distance and L2: decoded rendered vs raw features of the held-out views, pixel-weighted "
              "(lower is better); bank ceiling: each held-out feature cell replaced by its cosine-nearest bank row "
              "(no training); decoder ceiling: the row's memory attention decoding a free query fitted to each of "
              "2000 held-out cells (no Gaussians; Wm too when learnable). Params: `Memory.num_parameters` (Gaussians + "
              "decoders, M3's bank and Wm included). "
              "Train s: the training loop.", "",
              "Algorithm 1 seconds per bank (computed once, shared by its rows): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in report.get("psc_s", {}).items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", type=Path, default=Path("/tmp/rs_demo"))
    ap.add_argument("--config", type=Path, default=None, help="training YAML (default config/train.yaml)")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--holdout-every", type=int, default=8)
    ap.add_argument("--rows", nargs="+", default=None, help="row names to run (default: all, in table order)")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ablation_cpu")
    args = ap.parse_args()
    if args.list:
        print("\n".join(row.name for row in ROWS))
        return
    wanted = [row for row in ROWS if args.rows is None or row.name in args.rows]
    unknown = set(args.rows or ()) - {row.name for row in ROWS}
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; --list shows them")

    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    if previous and (previous.get("iterations"), previous.get("scene")) != (args.iterations, str(args.scene)):
        sys.exit(f"{args.out}.json holds rows of another scene or iteration count: choose another --out")
    scene = Scene.load(args.scene)
    device = resolve_device(load_train_config(args.config, {}).device)
    models = sorted({m for row in wanted for m in row.models})
    features = scene_features(scene, args.scene, models)
    report = {"benchmark": "fidelity ablation, held-out views", "machine": previous.get("machine") or
              machine_info(str(device)), "scene": str(args.scene), "iterations": args.iterations,
              "holdout_every": args.holdout_every,
              "commands": previous.get("commands", []) + [
                  f"cd bench && OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} ../.venv/bin/python "
                  + " ".join(shlex.quote(a) for a in sys.argv)],
              "rows": previous.get("rows", {}), "psc_s": previous.get("psc_s", {})}
    banks = Banks(features, device)
    for row in wanted:
        if row.name in report["rows"]:
            continue
        print(f"{row.name}: running", flush=True)
        with tempfile.TemporaryDirectory(prefix="m3-ablation-") as tmp:
            report["rows"][row.name] = {"method": row.method, "models": list(row.models),
                                        "overrides": row.overrides, "decoder_hidden": row.hidden,
                                        "wm_init": row.wm_init,
                                        **run_row(row, scene, features, args, banks, device, Path(tmp))}
        report["psc_s"].update(banks.seconds)
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
