"""One file per memory: Gaussians, PSC banks + Wm per model, extractor identities, config; written atomically."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianModel
from m3_memory.core.memory import MemoryAttention

CHECKPOINT_FORMAT = "m3-memory/1"


class CheckpointError(M3Error, ValueError):
    """A checkpoint that cannot be read as a memory; the message says why."""


@dataclass
class Memory:
    """A trained M3 memory: the Gaussians, one memory attention (PSC bank + Wm) and extractor identity per model."""

    gaussians: GaussianModel
    attentions: dict[str, MemoryAttention]
    identities: dict[str, dict]
    world_frame: str = "world"
    config: dict = field(default_factory=dict)
    iteration: int = 0
    views: dict = field(default_factory=dict)   # training cameras: c2w [n, 4, 4], K [n, 3, 3], width, height

    @property
    def models(self) -> list[str]:
        return list(self.attentions)

    def bank_sizes(self) -> dict[str, int]:
        return {name: int(a.psc.shape[0]) for name, a in self.attentions.items()}

    def num_parameters(self) -> int:
        """Learned + stored numbers: Gaussian parameters, PSC banks and Wm."""
        gaussian = sum(p.numel() for p in self.gaussians.parameters())
        return gaussian + sum(a.psc.numel() + a.wm.numel() for a in self.attentions.values())


def save_memory(path: str | Path, memory: Memory, training_state: dict | None = None) -> Path:
    """Write `memory` (and optional optimizer/strategy state for resuming) to `path` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "gaussians": {name: p.detach().cpu() for name, p in memory.gaussians.params.items()},
        "query_dims": memory.gaussians.query_dims,
        "sh_degree": memory.gaussians.sh_degree,
        "attentions": {name: {"state": {k: v.detach().cpu() for k, v in a.state_dict().items()},
                              "temperature": a.temperature, "learnable_wm": isinstance(a.wm, torch.nn.Parameter)}
                       for name, a in memory.attentions.items()},
        "identities": memory.identities,
        "world_frame": memory.world_frame,
        "config": memory.config,
        "iteration": memory.iteration,
        "views": memory.views,
        "training_state": training_state,
    }
    return write_atomic(path, lambda handle: torch.save(payload, handle))


def load_memory(path: str | Path, device: str | torch.device = "cpu") -> tuple[Memory, dict | None]:
    """Read a memory written by `save_memory`; returns it and its training state (None when absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no memory checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has format {found!r}; this version reads {CHECKPOINT_FORMAT!r}: retrain the "
                              "memory with this version")
    gaussians = GaussianModel(payload["gaussians"], payload["query_dims"], payload["sh_degree"]).to(device)
    attentions = {
        name: MemoryAttention.from_state_dict(entry["state"], temperature=entry["temperature"],
                                              learnable_wm=entry["learnable_wm"]).to(device)
        for name, entry in payload["attentions"].items()
    }
    memory = Memory(gaussians, attentions, payload["identities"], payload["world_frame"], payload["config"],
                    payload["iteration"], payload["views"])
    return memory, payload.get("training_state")
