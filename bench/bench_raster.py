"""Benchmark of `m3_memory.core.raster.rasterization`: forward and forward+backward time over scene sizes and
resolutions, C = 35 channels (RGB + 2 x 16-dim principal queries), one camera.

Run from the repository root with the package importable (installed, or PYTHONPATH=.):

    python bench/bench_raster.py                     # CPU backend, writes bench/results/raster_cpu.{json,md}
    python bench/bench_raster.py --backend cuda      # gsplat backend on a GPU machine -> raster_cuda.{json,md}
    python bench/bench_raster.py --baseline none     # CPU without the previous implementation

On CPU the previous implementation runs in the same process, repeats interleaved with ours, and the ratio is printed:
its kernel, Python glue and projection are read from git history (`--baseline REV`, default the commit before the
rewrite) and compiled once into the user cache (a minute or two, needs g++ and git).

The scene is a random volume of Gaussians filling the view (a stress case: every pixel sees hundreds of them);
focal length scales with the width so a Gaussian covers the same share of the image at every resolution.
"""

from __future__ import annotations

import os

# Idle OpenMP workers sleep instead of spinning: on a machine shared with other jobs spinning made timings several
# times slower and erratic. Must be set before torch loads OpenMP; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from m3_memory.core.raster import rasterization  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
# The CPU rasterizer before issue #18's rewrite (tile-row screening, channel loop per contributor, torch 3x3 bmm
# projection).
BASELINE = "b795a50"


def baseline_rasterizer(rev: str):
    """`rasterization_cpu` of git revision `rev`: its raster_cpu.cpp compiled under the user cache, its cpu.py and
    projection.py loaded as private modules bound to that build."""
    import subprocess
    import sys
    import types

    from torch.utils.cpp_extension import load

    from m3_memory.core.raster.extension import CFLAGS
    from m3_memory.core.resources import cache_dir

    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:m3_memory/core/raster/{path}"], check=True,
                              capture_output=True, text=True).stdout

    directory = cache_dir() / "bench_raster" / rev
    directory.mkdir(parents=True, exist_ok=True)
    cpp = directory / "raster_cpu.cpp"
    if not cpp.exists() or cpp.read_text() != source("csrc/raster_cpu.cpp"):
        cpp.write_text(source("csrc/raster_cpu.cpp"))
    ext = load(name=f"m3_raster_cpu_{rev}", sources=[str(cpp)], extra_cflags=list(CFLAGS),
               build_directory=str(directory))
    # its modules import each other as m3_memory.core.raster.*: renamed to a private package, the extension module
    # replaced by one handing out the build above
    package = f"m3_bench_baseline_{rev}"
    extension = sys.modules[f"{package}.extension"] = types.ModuleType(f"{package}.extension")
    extension.load_extension = lambda: ext
    for name in ("projection", "cpu"):
        module = sys.modules[f"{package}.{name}"] = types.ModuleType(f"{package}.{name}")
        code = source(f"{name}.py").replace("m3_memory.core.raster.", f"{package}.")
        exec(compile(code, f"{rev}:{name}.py", "exec"), module.__dict__)
    return sys.modules[f"{package}.cpu"].rasterization_cpu


@dataclass
class BenchConfig:
    """What to measure: Gaussian counts x image sizes, channels, repetitions (min and median reported)."""

    counts: tuple[int, ...] = (10_000, 50_000, 100_000)
    sizes: tuple[tuple[int, int], ...] = ((160, 120), (320, 240), (640, 480))
    channels: int = 35
    repeats: int = 5
    threads: int = 2
    backend: str = "cpu"
    seed: int = 0
    baseline: str = BASELINE  # git revision of the previous CPU implementation timed beside ours ("none": skip)


def make_scene(n: int, channels: int, width: int, height: int, device: str, seed: int):
    """Gaussians in a 4 x 3 x 4 m box 3-7 m in front of an identity camera; returns the rasterization inputs."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([4.0, 3.0, 4.0]) + torch.tensor([0.0, 0.0, 5.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.01), math.log(0.06), generator=g))
    opacities = 0.05 + 0.9 * torch.rand(n, generator=g)
    colors = torch.rand(n, channels, generator=g)
    f = 0.8 * width
    Ks = torch.tensor([[[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]])
    tensors = [t.to(device) for t in (means, quats, scales, opacities, colors, torch.eye(4)[None], Ks)]
    for t in tensors[:5]:
        t.requires_grad_(True)
    return tensors


def timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one call; CPU time is less disturbed by other
    jobs on a shared machine, and with T threads busy wall ~ CPU / T at best."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_one(cfg: BenchConfig, n: int, width: int, height: int, baseline=None) -> dict:
    """Timings of ours (and, when `baseline` is given, of that rasterizer in the same conditions: repeats
    alternate between the two)."""
    device = "cuda" if cfg.backend == "cuda" else "cpu"
    scene = make_scene(n, cfg.channels, width, height, device, cfg.seed)
    out = {}

    def ours(*args):
        return rasterization(*args, backend=cfg.backend)

    def forward(render=ours):
        out["r"] = render(*scene, width, height)

    def forward_backward(render=ours):
        rgb, alpha, depth, _ = render(*scene, width, height)
        (rgb.mean() + alpha.mean() + depth.mean()).backward()

    renders = [ours] + ([baseline] if baseline is not None else [])
    for render in renders:
        forward_backward(render)  # warm-up (and gsplat's JIT compile on CUDA)
    times = {render: {"fwd": [], "fb": []} for render in renders}
    for _ in range(cfg.repeats):
        for render in renders:
            times[render]["fwd"].append(timed(lambda: forward(render), device))
    for _ in range(cfg.repeats):
        for render in renders:
            times[render]["fb"].append(timed(lambda: forward_backward(render), device))
    forward()
    fwd, fwd_cpu = zip(*times[ours]["fwd"])
    fb, fb_cpu = zip(*times[ours]["fb"])
    _, alpha, _, meta = out["r"]
    previous = {}
    if baseline is not None:
        old_fwd, old_fb = [t for t, _ in times[baseline]["fwd"]], [t for t, _ in times[baseline]["fb"]]
        old_fb_cpu = [c for _, c in times[baseline]["fb"]]
        previous = {"baseline_forward_ms_min": 1e3 * min(old_fwd), "baseline_fwd_bwd_ms_min": 1e3 * min(old_fb),
                    "baseline_fwd_bwd_ms_median": 1e3 * statistics.median(old_fb),
                    "baseline_fwd_bwd_cpu_ms_min": 1e3 * min(old_fb_cpu),
                    "speedup_fwd_bwd_min": min(old_fb) / min(fb),
                    "speedup_fwd_bwd_median": statistics.median(old_fb) / statistics.median(fb),
                    # CPU time is what other jobs on a shared machine disturb least
                    "speedup_fwd_bwd_cpu_min": min(old_fb_cpu) / min(fb_cpu)}
    return {
        "gaussians": n,
        "width": width,
        "height": height,
        "channels": cfg.channels,
        "visible_gaussians": int((meta["radii"] > 0).all(-1).sum()),
        "tile_intersections": int(meta["flatten_ids"].numel()) if meta.get("flatten_ids") is not None else None,
        "mean_alpha": float(alpha.detach().mean()),
        "forward_ms_min": 1e3 * min(fwd),
        "forward_ms_median": 1e3 * statistics.median(fwd),
        "fwd_bwd_ms_min": 1e3 * min(fb),
        "fwd_bwd_ms_median": 1e3 * statistics.median(fb),
        "forward_cpu_ms_min": 1e3 * min(fwd_cpu),
        "fwd_bwd_cpu_ms_min": 1e3 * min(fb_cpu),
        "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **previous,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Rasterizer benchmark ({report['config']['backend']} backend)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads"
        f" (OMP_WAIT_POLICY={m['omp_wait_policy']})"
        + (f", GPU {m['gpu']} (gsplat {m['gsplat']})" if "gpu" in m else "")
        + f". Load average at start {tuple(round(x, 2) for x in m['load_average_at_start'])}: the machine is shared"
        " with other jobs, so timings are approximate (min of the repeats is the least disturbed).",
        "",
        f"Scene: random volume of Gaussians filling the view, C = {report['config']['channels']} channels, one camera;"
        " forward+backward includes projection, binning, compositing and the backward of all of them.",
        "",
        "| Gaussians | image | visible | tile pairs | mean alpha | fwd ms wall (min / median) | fwd+bwd ms wall"
        " (min / median) | fwd / fwd+bwd CPU ms (all threads) | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['gaussians']:,} | {r['width']}x{r['height']} | {r['visible_gaussians']:,} | "
            f"{r['tile_intersections'] or 0:,} | {r['mean_alpha']:.2f} | {r['forward_ms_min']:.0f} / "
            f"{r['forward_ms_median']:.0f} | {r['fwd_bwd_ms_min']:.0f} / {r['fwd_bwd_ms_median']:.0f} | "
            f"{r['forward_cpu_ms_min']:.0f} / {r['fwd_bwd_cpu_ms_min']:.0f} | {r['peak_rss_mb_so_far']:.0f} |"
        )
    lines += ["", "Peak RSS is the process maximum so far (runs go from small to large)."]
    rows = [r for r in report["results"] if "baseline_fwd_bwd_ms_min" in r]
    if rows:
        lines += [
            "",
            f"Against the previous implementation (git {report['config']['baseline']}), timed in the same run with"
            " repeats alternating between the two:",
            "",
            "| Gaussians | image | previous fwd ms (min) | ours fwd ms (min) | previous fwd+bwd ms (min / median) |"
            " ours fwd+bwd ms (min / median) | speed-up fwd+bwd (min / median) | previous / ours fwd+bwd CPU ms (min) |"
            " speed-up fwd+bwd CPU (min) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['gaussians']:,} | {r['width']}x{r['height']} | {r['baseline_forward_ms_min']:.0f} | "
                f"{r['forward_ms_min']:.0f} | {r['baseline_fwd_bwd_ms_min']:.0f} / "
                f"{r['baseline_fwd_bwd_ms_median']:.0f}"
                f" | {r['fwd_bwd_ms_min']:.0f} / {r['fwd_bwd_ms_median']:.0f} | {r['speedup_fwd_bwd_min']:.2f}x / "
                f"{r['speedup_fwd_bwd_median']:.2f}x | {r['baseline_fwd_bwd_cpu_ms_min']:.0f} / "
                f"{r['fwd_bwd_cpu_ms_min']:.0f} | {r['speedup_fwd_bwd_cpu_min']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=BenchConfig.threads)
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--quick", action="store_true", help="only 10k Gaussians at 160x120 (smoke run)")
    parser.add_argument("--only", default=None, metavar="N,WxH", help="one case, e.g. 50000,320x240")
    parser.add_argument("--baseline", default=BenchConfig.baseline,
                        help=f"git revision of the previous CPU rasterizer to time beside ours (default {BASELINE}); "
                             "none: skip")
    parser.add_argument("--out", type=Path, default=None, help="results basename (default bench/results/raster_<backend>)")
    args = parser.parse_args()
    cfg = BenchConfig(backend=args.backend, threads=args.threads, repeats=args.repeats, baseline=args.baseline)
    if args.quick:
        cfg.counts, cfg.sizes = (10_000,), ((160, 120),)
    if args.only:
        count, size = args.only.split(",")
        cfg.counts, cfg.sizes = (int(count),), (tuple(int(x) for x in size.split("x")),)
    torch.set_num_threads(cfg.threads)
    baseline = None if cfg.backend == "cuda" or cfg.baseline == "none" else baseline_rasterizer(cfg.baseline)
    report = {"config": asdict(cfg), "machine": {**machine_info(cfg.backend), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
              "results": []}
    for width, height in cfg.sizes:
        for n in cfg.counts:
            row = bench_one(cfg, n, width, height, baseline)
            print(json.dumps(row), flush=True)
            if "speedup_fwd_bwd_min" in row:
                print(f"{n:,} Gaussians at {width}x{height}: fwd+bwd {row['baseline_fwd_bwd_ms_min']:.0f} ms before,"
                      f" {row['fwd_bwd_ms_min']:.0f} ms now (min wall): {row['speedup_fwd_bwd_min']:.2f}x; CPU"
                      f" {row['baseline_fwd_bwd_cpu_ms_min']:.0f} ms before, {row['fwd_bwd_cpu_ms_min']:.0f} ms now:"
                      f" {row['speedup_fwd_bwd_cpu_min']:.2f}x", flush=True)
            report["results"].append(row)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    write_report(args.out or RESULTS / f"raster_{cfg.backend}", report, markdown(report))

if __name__ == "__main__":
    main()
