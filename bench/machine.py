"""What every benchmark stores beside its figures: the machine (CPU, cores, torch, GPU, load) and the two result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine_info(device: str = "cpu") -> dict:
    """CPU model, logical CPUs, torch version and threads, Python, load average now; GPU name when `device` is cuda."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import gsplat

            info["gsplat"] = gsplat.__version__
        except ImportError:
            pass
    return info


def describe(info: dict) -> str:
    """One Markdown sentence for a results file."""
    text = f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} ({info['torch_threads']} threads)"
    if "gpu" in info:
        text += f", GPU {info['gpu']}" + (f" with gsplat {info['gsplat']}" if "gsplat" in info else "")
    load = tuple(round(x, 2) for x in info["load_average_at_start"])
    return text + f"; load average at start {load}"


def write_report(out: Path, report: dict, markdown: str) -> None:
    """`out`.json (figures + machine) and `out`.md side by side; prints the Markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
