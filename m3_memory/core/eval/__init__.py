"""Evaluation of trained memories (M3 or the distillation baseline) on held-out views; `m3 eval` runs it.

Names resolve lazily so that importing the package (e.g. for `EvalConfig` defaults) loads no torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluation": (
        "DISTRACTOR_CAPTIONS", "EvalConfig", "GroundTruth", "evaluate", "held_out_views", "load_ground_truth",
        "report_markdown",
    ),
    "metrics": ("feature_fidelity", "grounding_summary", "mask_overlap", "recall_at_k"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


def __getattr__(name: str):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
