"""`m3 eval SCENE CHECKPOINT`: evaluate an M3 memory or a distillation baseline on the scene's held-out views."""
from __future__ import annotations

import json
from pathlib import Path


def _eval(args) -> int:
    from m3_memory.core.atomic import write_atomic
    from m3_memory.core.checkpoint import load_memory
    from m3_memory.core.errors import M3Error
    from m3_memory.core.pipeline import scene_features
    from m3_memory.core.eval.evaluation import EvalConfig, evaluate, report_markdown
    from m3_memory.core.scene import Scene

    scene = Scene.load(args.scene)
    memory, _ = load_memory(args.checkpoint, args.device)
    features, notes = {}, []
    for model in memory.models:
        try:
            name = memory.identities[model]["name"]
            features[model] = scene_features(scene, args.scene, [name])[name]
        except M3Error as exc:
            notes.append(f"{model}: no raw features for fidelity ({exc})")
    report = evaluate(scene, memory, features, config=EvalConfig(method=args.method))
    report["checkpoint"] = str(args.checkpoint)
    report["notes"] += notes
    out = args.out or args.checkpoint.parent / f"{args.checkpoint.stem}-eval"
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_localisation(report, out / "localisation.png")
    if plot is None:
        report["notes"].append("plot skipped: matplotlib is not installed")
    write_atomic(out / "eval.json", lambda h: h.write((json.dumps(report, indent=2) + "\n").encode()))
    markdown = report_markdown(report) + ("" if plot is None else f"\n![3D localisation]({plot.name})\n")
    write_atomic(out / "eval.md", lambda h: h.write(markdown.encode()))
    summary = {"out": str(out), "method": report["method"], "psnr": round(report["rgb"]["psnr"], 2),
               "views": len(report["views"]["evaluated"]), "held_out": report["views"]["held_out"],
               "parameters": report["cost"]["parameters"], "plot": None if plot is None else str(plot)}
    print(json.dumps(summary))
    return 0


def plot_localisation(report: dict, path: Path) -> Path | None:
    """Bar chart of each object's 3D error (rendered locate and direct 3D query) of the first text model with the
    success radius drawn; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    if not report["localisation"]:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, loc = next(iter(report["localisation"].items()))
    rows = loc["per_object"]
    xs = range(len(rows))
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    bars = ((-0.2, "rendered_error_m", "locate (rendered)"), (0.2, "direct_3d_error_m", "direct 3D"))
    for offset, key, label in bars:
        # an unanswered query is drawn as a zero-height bar and named in the labels below
        axes.bar([x + offset for x in xs], [100 * (r[key] or 0.0) for r in rows], width=0.4, label=label)
    axes.axhline(100 * report["config"]["success_radius_m"], color="k", linestyle="--", linewidth=1, label="success")
    axes.set_xticks(list(xs), [r["phrase"] + ("\n(no answer)" if r["rendered_error_m"] is None else "") for r in rows],
                    rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("error to GT centre [cm]")
    axes.set_title(f"{report['method']} / {model}: 3D localisation")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def register(verbs) -> None:
    evaluate = verbs.add_parser("eval", help="evaluate a memory (M3 or distillation baseline) on held-out views")
    evaluate.add_argument("scene", type=Path)
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--out", type=Path, default=None, help="report folder (default CHECKPOINT-eval beside it)")
    evaluate.add_argument("--method", choices=["otsu", "relevancy"], default="otsu", help="pixel scoring")
    evaluate.add_argument("--device", default="cpu", help="where to render (cpu or cuda)")
    evaluate.set_defaults(func=_eval)
