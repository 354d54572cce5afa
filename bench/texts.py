"""Text-query embeddings computed once where the text model is installed, read back where it is not (a GPU machine
with no registry access has torch but not the MiniLM package m3-tinyvlm's text side needs)."""

from __future__ import annotations

from pathlib import Path

import torch


class TextCache:
    """`phrases [T] -> embeddings [T, d]` of `model`'s text side, kept in `path` (None: no file, always computed)."""

    def __init__(self, model: str, path: Path | None):
        self.model, self.path = model, path
        self.table: dict[str, torch.Tensor] = {}
        if path is not None and path.exists():
            stored = torch.load(path)
            if stored["model"] != model:
                raise SystemExit(f"{path} holds {stored['model']} embeddings, not {model}'s: delete it to recompute")
            self.table = dict(zip(stored["phrases"], stored["embeddings"]))

    def __call__(self, phrases: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(phrases) if p not in self.table]
        if missing:
            from m3_memory.core.features.registry import build_extractor

            self.table.update(zip(missing, build_extractor(self.model).encode_text(missing).cpu()))
            if self.path is not None:
                phrases_all = list(self.table)
                torch.save({"model": self.model, "phrases": phrases_all,
                            "embeddings": torch.stack([self.table[p] for p in phrases_all])}, self.path)
        return torch.stack([self.table[p] for p in phrases])
