"""Principal scene components (M3, Algorithm 1): exact greedy similarity cover, memory-bounded.

Semantics (the authors' greedy cover, made precise):
  * every row r_i of the raw features R [N, d] is normalised in float64, r̂_i = r_i / ‖r_i‖ (after an exact power-of-two
    rescaling, so finite rows of any magnitude normalise without overflow), and s(i, j) = Σ_k r̂_ik r̂_jk in float64
    (``exact_cosine``);
  * rows are walked in index order; a row j that is already *used* is skipped; otherwise J = {i : s(j, i) ≥ θ} over all
    rows; if no row of J is used, j is kept as a component and every row of J becomes used; else j is rejected;
  * rows whose raw feature is all zeros (the method masks those pixels) take no part at all: they are never kept and never
    belong to any J. Non-finite rows are rejected with a ValueError;
  * θ must lie in (0, 1 − δ): every row is then in its own J. Use θ = 0.9999 for "exact duplicates only" (SEEM).

The plain form computes a [chunk, N] similarity block for every chunk of rows, O(N²·d). This implementation keeps
exactly the same rows but only does work for rows whose fate is open, so it costs about (kept + rejected) · N · d:

  * a row used before its turn is skipped. Windows hold the next ``chunk`` unused rows; one [w, w] product inside the
    window and one [w, t] product against the kept bank answer everything that does not need the whole scene;
  * a row with no kept row within angle 2·arccos θ (s < 2θ² − 1) cannot have a used neighbour (triangle inequality on the
    sphere), so it is kept without looking at the other N rows. Only the remaining rows are *evaluated*: up to ``batch``
    of them at a time in one pass over all rows in column blocks (memory O(batch · block), never N × N), which gives per
    row "a neighbour is already used" and, per pair of evaluated rows, "their neighbourhoods overlap";
  * kept rows mark their neighbourhood used in the next pass (marking and evaluating share passes);
  * a sequential walk over the window applies Algorithm 1 literally with these facts, so the kept set is exact;
  * decisions are screened in float32 with a worst-case rounding bound δ; pairs within δ of θ are recomputed in float64.

Memory: O(N) flags, the normalised rows (N × d float32) and O(chunk · block) work.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

# Largest number of row pairs recomputed in float64 at once.
_EXACT_PAIRS = 65536


@dataclass(frozen=True)
class PSCConfig:
    """Per-model settings of Algorithm 1.

    threshold: cosine θ above which a row joins a component (CLIP ~0.9, DINOv2 ~0.75, SEEM 0.9999, ...).
    chunk: rows per window (its [chunk, chunk] self-similarity is held at once).
    block: rows per column block of a pass over all rows; work memory is about batch × block float32.
    batch: most rows evaluated (compared with all N rows) in one pass.
    """

    threshold: float
    chunk: int = 2048
    block: int = 16384
    batch: int = 128

    def __post_init__(self):
        if min(self.chunk, self.block, self.batch) < 1:
            raise ValueError(f"chunk, block and batch must be positive, got {self.chunk}, {self.block}, {self.batch}")


@dataclass
class PSCResult:
    """components: [t, d] raw kept rows (float32; float64 for float64 input, whose rows may exceed float32's range);
    indices: [t] int64 ascending row indices into the input; n_input: N (zero rows included);
    reduction_ratio: N / t (how many times smaller the bank is)."""

    components: torch.Tensor
    indices: torch.Tensor
    n_input: int
    reduction_ratio: float


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows x [P, d] (any float dtype) normalised in float64 -> [P, d]; zero rows stay zero.

    Each row is first scaled by a power of two (exact) that brings its largest entry into [0.5, 1), so the norm never
    overflows or underflows and the result equals r / ‖r‖ computed without the scaling wherever that one is finite.
    """
    x64 = x.double()
    exponent = torch.frexp(x64.abs().amax(dim=1, keepdim=True)).exponent
    half = exponent // 2  # two steps: 2^-exponent alone overflows for subnormal rows
    scaled = torch.ldexp(torch.ldexp(x64, -half), half - exponent)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return scaled / torch.where(norm > 0, norm, 1.0)


def exact_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference similarity of paired rows a [P, d], b [P, d] (any float dtype) -> [P] float64."""
    return (unit_rows(a) * unit_rows(b)).sum(-1)


def screening_margin(d: int) -> float:
    """Bound δ on |float32 screening similarity − exact similarity| for unit rows of dimension d.

    A float32 dot product of length d errs by at most ~d·u (u = 2⁻²⁴) for unit vectors; rounding the float64 unit rows
    to float32 adds a few u. Twice that, plus a floor, is a safe margin.
    """
    return 2.0 * (d + 8) * 2.0**-24 + 1e-6


@contextlib.contextmanager
def _full_fp32_matmul():
    """Disable TF32 / bf16 shortcuts for float32 matmuls: the screening bound δ assumes true float32 products."""
    precision = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


class _Rows:
    """Read access to features [N, d] held as a torch tensor, a numpy array or a numpy memmap (not loaded at once)."""

    def __init__(self, features):
        if isinstance(features, torch.Tensor):
            self._data, self._is_torch = features.detach(), True
            self.dtype = features.dtype
        elif isinstance(features, np.ndarray):
            self._data, self._is_torch = features, False
            self.dtype = torch.from_numpy(np.empty(0, dtype=features.dtype)).dtype
        else:
            raise TypeError(f"features must be a torch.Tensor or numpy array, got {type(features).__name__}")
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}")
        if not self.dtype.is_floating_point:
            raise TypeError(f"features must be floating point, got {self.dtype}")
        self.n, self.d = int(features.shape[0]), int(features.shape[1])
        self.device = features.device if self._is_torch else torch.device("cpu")

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) -> [stop - start, d] tensor in the input dtype."""
        if self._is_torch:
            return self._data[start:stop]
        return torch.from_numpy(np.array(self._data[start:stop]))  # a writable copy of one block

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx [P] (int64, CPU) -> [P, d] CPU tensor in the input dtype."""
        if self._is_torch:
            return self._data[idx.to(self._data.device)].cpu()
        return torch.from_numpy(np.asarray(self._data[idx.numpy()]))


class _Greedy:
    """One run of Algorithm 1 over the valid (non-zero) rows, addressed by pool position 0..M-1.

    unit: [M, d] float32 normalised rows on the device; idx: [M] int64 CPU global row index of each pool row;
    used: [M] bool on the device; bank: [t, d] float32 unit rows of the kept rows (all marked used between windows).
    """

    def __init__(self, rows: _Rows, cfg: PSCConfig, device: torch.device):
        self.rows, self.cfg = rows, cfg
        self.theta = float(cfg.threshold)
        self.delta = screening_margin(rows.d)
        if not 0.0 < self.theta < 1.0 - self.delta:
            raise ValueError(f"threshold must lie in (0, {1 - self.delta:.6f}); use e.g. 0.9999 for exact duplicates")
        # Two rows with a common neighbour are within angle 2·arccos θ, i.e. s ≥ 2θ² − 1; 2δ covers screening error.
        self.near = 2.0 * self.theta**2 - 1.0 - 2.0 * self.delta
        self.unit = torch.empty(rows.n, rows.d, dtype=torch.float32, device=device)
        valid = torch.zeros(rows.n, dtype=torch.bool)
        m = 0
        for s in range(0, rows.n, cfg.block):
            x = rows.block(s, min(s + cfg.block, rows.n)).to(device)
            if not torch.isfinite(x).all():
                raise ValueError(f"features contain non-finite values in rows [{s}, {s + x.shape[0]})")
            ok = (x != 0).any(dim=1)
            k = int(ok.sum())
            self.unit[m:m + k] = unit_rows(x[ok]).float()
            valid[s:s + x.shape[0]] = ok.cpu()
            m += k
        self.unit = self.unit[:m]
        self.idx = torch.nonzero(valid).squeeze(1)
        self.used = torch.zeros(m, dtype=torch.bool, device=device)
        self.bank = self.unit[:0]
        self.kept: list[int] = []

    def at_least(self, sims: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact s ≥ θ for screening values sims [P, Q] of pool rows a [P] × b [Q] (device tensors) -> [P, Q] bool."""
        hit = sims >= self.theta + self.delta
        band = torch.nonzero((sims > self.theta - self.delta) & ~hit)
        for s in range(0, band.shape[0], _EXACT_PAIRS):
            i, j = band[s:s + _EXACT_PAIRS].T
            ga, gb = self.idx[a[i].cpu()], self.idx[b[j].cpu()]
            exact = exact_cosine(self.rows.gather(ga), self.rows.gather(gb)) >= self.theta
            hit[i, j] = exact.to(hit.device)
        return hit

    def run(self) -> torch.Tensor:
        """Walk all rows, one window of ``chunk`` unused rows at a time; returns kept pool positions [t] ascending."""
        m, cursor, step = self.unit.shape[0], 0, 4 * self.cfg.chunk
        while cursor < m:
            found = []  # unused rows from cursor on, read in pieces rather than one scan of the tail per window
            n_found = 0
            while cursor < m and n_found < self.cfg.chunk:
                piece = torch.nonzero(~self.used[cursor:cursor + step]).squeeze(1) + cursor
                found.append(piece)
                n_found += piece.numel()
                cursor = min(cursor + step, m)
            window = torch.cat(found)[: self.cfg.chunk] if found else torch.empty(0, dtype=torch.int64)
            if window.numel() == 0:
                break
            cursor = int(window[-1]) + 1
            self.window(window)
        return torch.tensor(self.kept, dtype=torch.int64)

    def window(self, window: torch.Tensor) -> None:
        """Decide every row of window [w] (unused pool positions, ascending, on the device)."""
        w = window.numel()
        q = self.unit[window]
        self_sims = q @ q.T
        cover = self.at_least(self_sims, window, window).cpu().numpy()  # cover[k, j]: s(k, j) ≥ θ
        near = np.triu((self_sims >= self.near).cpu().numpy(), 1)  # near[k, j], k < j: k, j may share a neighbour
        near_bank = ((q @ self.bank.T) >= self.near).any(dim=1).cpu().numpy()
        status = np.zeros(w, dtype=np.int8)  # 0 open, 1 kept, 2 rejected or used
        unmarked: list[int] = []  # kept window positions whose neighbourhood is not yet marked used
        evaluated: dict[int, int] = {}  # window position -> row of hit_used / overlap from the last pass
        hit_used = overlap = None
        used = self.used[window].cpu().numpy()
        p = 0
        while p < w:
            kept_before = status[:p] == 1
            if used[p] or cover[:p, p][kept_before].any():
                status[p] = 2
            elif not (near_bank[p] or near[:p, p][kept_before].any()):
                status[p] = 1  # no kept row within 2·arccos θ: no neighbour can be used
            elif p in evaluated and all(k in evaluated or not near[k, p] for k in unmarked):
                e = evaluated[p]
                clash = hit_used[e] or any(overlap[e, evaluated[k]] for k in unmarked if k in evaluated)
                status[p] = 2 if clash else 1
            else:
                # Evaluate p and the next open rows that may need it, marking the pending kept rows in the same pass.
                later = np.arange(p, w)
                may_clash = near_bank[later] | (near[:, later] & (status != 2)[:, None]).any(axis=0)
                todo = later[(status[later] == 0) & ~used[later] & may_clash][: self.cfg.batch]
                hit_used, overlap = self.scan(window[unmarked], window[todo])
                evaluated = {int(j): e for e, j in enumerate(todo)}
                unmarked = []
                used = self.used[window].cpu().numpy()
                continue
            if status[p] == 1:
                unmarked.append(p)
                self.kept.append(int(window[p]))
            p += 1
        if unmarked:
            self.scan(window[unmarked], window[:0])
        self.bank = torch.cat([self.bank, q[torch.from_numpy(status == 1).to(q.device)]])

    def scan(self, mark: torch.Tensor, todo: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One pass over all rows in column blocks: mark the neighbourhoods of kept rows mark [k] used, then evaluate
        rows todo [e] (pool positions). Returns hit_used [e] bool (a neighbour is used, the marks included) and
        overlap [e, e] bool (the two rows' neighbourhoods share a row)."""
        k, e = mark.numel(), todo.numel()
        rows = torch.cat([mark, todo])
        q = self.unit[rows]
        hit_used = torch.zeros(e, dtype=torch.bool, device=q.device)
        overlap = torch.zeros(e, e, device=q.device)
        for s in range(0, self.unit.shape[0], self.cfg.block):
            stop = min(s + self.cfg.block, self.unit.shape[0])
            sims = self.unit[s:stop] @ q.T  # [b, k + e]: this orientation is the faster one
            hit = self.at_least(sims, torch.arange(s, stop, device=q.device), rows)
            if k:
                self.used[s:stop] |= hit[:, :k].any(dim=1)
            if e:
                members = hit[:, k:]
                hit_used |= (members & self.used[s:stop, None]).any(dim=0)
                if e > 1:
                    f = members.float()
                    overlap += f.T @ f  # counts of shared rows; only > 0 matters, which float32 sums keep
        return hit_used.cpu().numpy(), (overlap > 0).cpu().numpy()


def principal_scene_components(features, cfg: PSCConfig, device=None) -> PSCResult:
    """Principal scene components of raw features [N, d] (torch tensor, numpy array or float16 memmap).

    device: where the similarity work runs (default: the tensor's device, CPU for numpy input).
    Returns PSCResult(components [t, d] raw rows, indices [t] int64 ascending, n_input N, reduction_ratio N / t).
    """
    rows = _Rows(features)
    device = torch.device(device) if device is not None else rows.device
    with _full_fp32_matmul(), torch.no_grad():
        greedy = _Greedy(rows, cfg, device)
        indices = greedy.idx[greedy.run()]
    components = rows.gather(indices)
    components = components.double() if rows.dtype == torch.float64 else components.float()
    t = indices.numel()
    return PSCResult(components, indices, rows.n, rows.n / t if t else float("inf"))
