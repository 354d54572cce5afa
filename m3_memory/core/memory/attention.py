"""Gaussian memory attention (M3 §3.3): decode a rendered principal query into a foundation-model feature.

    R̂ = softmax(cos(Q Wm, PSC) / τ) PSC

Q [P, l] are rendered principal queries (this model's slice), Wm [l, d] projects them into the model's feature space,
PSC [t, d] is the bank of principal scene components (raw rows), τ = 0.05. As in the authors' code Wm stays at its
seeded random initialisation by default (a buffer); ``learnable_wm=True`` makes it a parameter for the ablation.
``wm_init="principal"`` starts Wm at the bank's l leading singular directions instead: a random l-dim Wm keeps only
part of each unit bank row, so the cosine scores of neighbouring rows stay close and the softmax blends them.
``top_k = k > 0`` keeps only each query's k best-scoring rows in the softmax (a sparse attention, also an ablation);
0 is the dense softmax.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

WM_INITS = ("random", "principal")


def principal_directions(psc: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` leading right singular directions [count, d] (orthonormal rows, on the CPU) of the unit rows of
    psc [t, d]: the count-dim subspace that keeps most of the unit bank rows. Asks for count ≤ d."""
    keys = F.normalize(psc.detach().float(), dim=1)
    _, vectors = torch.linalg.eigh((keys.T @ keys).double().cpu())   # ascending eigenvalues of the [d, d] Gram matrix
    return vectors[:, -count:].flip(1).T.float()


class MemoryAttention(nn.Module):
    """Attention of queries over a fixed memory bank.

    query_dim: l; psc: [t, d] bank (stored as float32 buffer ``psc``); temperature: τ; learnable_wm: Wm as
    nn.Parameter instead of a buffer; seed: seeds the random Wm [l, d] (N(0, 1/l)); wm_init: "random" (that Wm) or
    "principal" (`principal_directions` of the bank, scaled to the random rows' expected norm √(d/l); l ≤ d); chunk:
    pixels per step of ``decode_map``; top_k: rows per query in the softmax (0, or t and more: all of them, the dense
    softmax).
    """

    def __init__(
        self,
        query_dim: int,
        psc: torch.Tensor,
        temperature: float = 0.05,
        learnable_wm: bool = False,
        seed: int = 0,
        chunk: int = 16384,
        top_k: int = 0,
        wm_init: str = "random",
    ):
        super().__init__()
        if top_k < 0:
            raise ValueError(f"top_k must be 0 (dense) or a positive row count, got {top_k}")
        psc = torch.as_tensor(psc).detach().float().clone()
        if psc.ndim != 2 or psc.shape[0] == 0:
            raise ValueError(f"psc must be a non-empty [t, d] bank, got shape {tuple(psc.shape)}")
        if wm_init not in WM_INITS:
            raise ValueError(f"wm_init must be one of {WM_INITS}, got {wm_init!r}")
        if wm_init == "principal":
            if query_dim > psc.shape[1]:
                raise ValueError(f"wm_init 'principal' needs query_dim ≤ d, got {query_dim} > {psc.shape[1]}")
            wm = principal_directions(psc, query_dim) * math.sqrt(psc.shape[1] / query_dim)
        else:
            generator = torch.Generator().manual_seed(seed)
            wm = torch.randn(query_dim, psc.shape[1], generator=generator) / math.sqrt(query_dim)
        if learnable_wm:
            self.wm = nn.Parameter(wm)
        else:
            self.register_buffer("wm", wm)
        self.register_buffer("psc", psc)
        self.temperature = float(temperature)
        self.chunk = int(chunk)
        self.top_k = int(top_k)

    @property
    def bank_size(self) -> int:
        """Rows t of the bank."""
        return int(self.psc.shape[0])

    @classmethod
    def from_state_dict(cls, state: dict, **kwargs) -> "MemoryAttention":
        """Rebuild a module from a saved state dict (its ``wm`` [l, d] and ``psc`` [t, d]); kwargs as __init__."""
        module = cls(state["wm"].shape[0], state["psc"], **kwargs)
        module.load_state_dict(state)
        return module

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [P, l] -> decoded features [P, d]; materialises [P, t] scores (use decode_map for whole images).

        cos(q Wm, k) is computed without forming q Wm [P, d]: (q Wm)·k̂ = q (Wm k̂ᵀ) and ‖q Wm‖² = q (Wm Wmᵀ) qᵀ, so the
        scores cost P·l·t instead of P·d·t. With ``top_k`` the softmax runs over each query's k best rows only and the
        decoded feature mixes those k rows ([P, k, d] gathered), so its gradient reaches only them.
        """
        keys = F.normalize(self.psc, dim=1)
        dots = queries @ (self.wm @ keys.T)  # [P, t]
        norms = ((queries @ (self.wm @ self.wm.T)) * queries).sum(1, keepdim=True).clamp_min(1e-24).sqrt()  # [P, 1]
        scores = dots / (norms * self.temperature)
        if 0 < self.top_k < self.bank_size:
            best, rows = scores.topk(self.top_k, dim=1)  # [P, k]
            return torch.einsum("pk,pkd->pd", torch.softmax(best, dim=1), self.psc[rows])
        return torch.softmax(scores, dim=1) @ self.psc

    def decode_map(self, query_map: torch.Tensor) -> torch.Tensor:
        """query_map [H, W, l] -> [H, W, d], ``chunk`` pixels at a time so that no [H·W, t] tensor exists.

        With autograd on, each chunk is checkpointed: only its inputs are kept and scores are recomputed in backward.
        """
        h, w, l = query_map.shape
        flat = query_map.reshape(h * w, l)
        if torch.is_grad_enabled() and (flat.requires_grad or self.wm.requires_grad):
            parts = [checkpoint(self.forward, flat[s:s + self.chunk], use_reentrant=False)
                     for s in range(0, h * w, self.chunk)]
            return torch.cat(parts).reshape(h, w, -1)
        out = flat.new_empty(h * w, self.psc.shape[1])
        for s in range(0, h * w, self.chunk):
            out[s:s + self.chunk] = self(flat[s:s + self.chunk])
        return out.reshape(h, w, -1)
