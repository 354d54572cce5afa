"""One file per memory: Gaussians, a decoder per model (M3: PSC bank + Wm; the distillation baseline: its MLP),
extractor identities, config; written atomically."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianModel
from m3_memory.core.memory import FeatureDecoder, MemoryAttention

CHECKPOINT_FORMAT = "m3-memory/1"


class CheckpointError(M3Error, ValueError):
    """A checkpoint that cannot be read as a memory; the message says why."""


@dataclass
class Memory:
    """A trained memory: the Gaussians, one decoder and extractor identity per model. The decoder is M3's memory
    attention (PSC bank + Wm) or, for the distillation baseline, its `FeatureDecoder` MLP."""

    gaussians: GaussianModel
    attentions: dict[str, MemoryAttention | FeatureDecoder]
    identities: dict[str, dict]
    world_frame: str = "world"
    config: dict = field(default_factory=dict)
    iteration: int = 0
    views: dict = field(default_factory=dict)   # training cameras: c2w [n, 4, 4], K [n, 3, 3], width, height

    @property
    def models(self) -> list[str]:
        return list(self.attentions)

    def bank_sizes(self) -> dict[str, int]:
        """PSC rows per model, for the decoders that have a bank."""
        return {name: int(a.psc.shape[0]) for name, a in self.attentions.items() if hasattr(a, "psc")}

    def num_parameters(self) -> int:
        """Learned + stored numbers: Gaussian parameters and every decoder's parameters and buffers (M3: PSC + Wm)."""
        gaussian = sum(p.numel() for p in self.gaussians.parameters())
        return gaussian + sum(t.numel() for a in self.attentions.values() for t in [*a.parameters(), *a.buffers()])


def _decoder_entry(decoder: MemoryAttention | FeatureDecoder) -> dict:
    """What `_load_decoder` needs to rebuild `decoder`: its kind, settings and tensors (on the CPU)."""
    state = {k: v.detach().cpu() for k, v in decoder.state_dict().items()}
    if isinstance(decoder, FeatureDecoder):
        return {"kind": "mlp", "dims": decoder.dims, "state": state}
    return {"kind": "attention", "state": state, "temperature": decoder.temperature,
            "learnable_wm": isinstance(decoder.wm, torch.nn.Parameter)}


def _load_decoder(entry: dict, path: Path) -> MemoryAttention | FeatureDecoder:
    kind = entry.get("kind", "attention")   # checkpoints written before the baseline joined the format have no kind
    if kind == "attention":
        return MemoryAttention.from_state_dict(entry["state"], temperature=entry["temperature"],
                                               learnable_wm=entry["learnable_wm"])
    if kind == "mlp":
        latent, hidden, feature = entry["dims"]
        decoder = FeatureDecoder(latent, feature, hidden)
        decoder.load_state_dict(entry["state"])
        return decoder
    raise CheckpointError(f"{path} holds a decoder of kind {kind!r}; this version reads 'attention' and 'mlp'")


def save_memory(path: str | Path, memory: Memory, training_state: dict | None = None) -> Path:
    """Write `memory` (and optional optimizer/strategy state for resuming) to `path` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "gaussians": {name: p.detach().cpu() for name, p in memory.gaussians.params.items()},
        "query_dims": memory.gaussians.query_dims,
        "sh_degree": memory.gaussians.sh_degree,
        "attentions": {name: _decoder_entry(a) for name, a in memory.attentions.items()},
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
    attentions = {name: _load_decoder(entry, path).to(device) for name, entry in payload["attentions"].items()}
    memory = Memory(gaussians, attentions, payload["identities"], payload["world_frame"], payload["config"],
                    payload["iteration"], payload["views"])
    return memory, payload.get("training_state")
