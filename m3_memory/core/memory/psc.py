"""Principal scene components (M3, Algorithm 1): exact greedy similarity cover, memory-bounded.

Semantics (the authors' greedy cover, made precise):
  * every row r_i of the raw features R [N, d] is normalised, r̂_i = r_i / ‖r_i‖, and the similarity of two rows is
    s(i, j) = Σ_k r̂_ik r̂_jk evaluated in float64 (``exact_cosine``);
  * rows are walked in index order; a row j that is already *used* is skipped; otherwise J = {i : s(j, i) ≥ θ}; if no row
    of J is used, j is kept as a component and every row of J becomes used;
  * rows whose raw feature is all zeros (the method masks those pixels) take no part at all: they are never kept and never
    belong to any J. Non-finite rows are rejected with a ValueError.
  * θ must lie in (0, 1 − δ): every row is then in its own J. Use θ = 0.9999 for "exact duplicates only" (SEEM).

The naive form computes a [chunk, N] similarity block for every chunk of rows, O(N²·d) time and O(chunk·N) memory. This
implementation keeps exactly the same rows but computes similarities only for rows whose fate is open:

  * a row already used when its turn comes is decided without any work. In clustered features (pixels of one object)
    that is almost every row, so the work is about (t + rejected) · N · d instead of N² · d;
  * the next ``chunk`` open rows form a window. One [w, w] product finds, for each row, earlier "leader" rows that
    certainly have it as a neighbour (s ≥ θ + δ); such a row is not evaluated, since it becomes used as soon as one of its
    leaders is kept. Only when all its leaders are rejected is it evaluated, in a follow-up pass;
  * evaluated rows are compared with every valid row in column blocks (memory O(chunk · block), never N × N), giving per
    row "has a neighbour that is already used" and its neighbour list among the unused rows (at most ``max_pairs`` pairs
    are held; rows past the cap wait for the next pass);
  * a sequential walk over the window applies Algorithm 1 literally with these facts, so the kept set is exact;
  * decisions are screened in float32 with a worst-case rounding bound δ; pairs within δ of θ are recomputed in float64.

Memory: O(N) flags, the rows (N × d in the input's dtype: float16 stays float16) and O(chunk · block + max_pairs) work.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

# Largest number of row pairs recomputed in float64 at once.
_EXACT_PAIRS = 65536
# Fewest rows per similarity pass when a window walk stalls (a pass is memory-bound below about this many rows).
_MIN_BATCH = 128


@dataclass(frozen=True)
class PSCConfig:
    """Per-model settings of Algorithm 1.

    threshold: cosine θ above which a row joins a component (CLIP ~0.9, DINOv2 ~0.75, SEEM 0.9999, ...).
    chunk: rows decided per window (also the tile size of row-by-row products).
    block: rows per column block of the similarity pass; work memory is about chunk × block float32.
    max_pairs: cap on the neighbour pairs held for one window (16 bytes each).
    """

    threshold: float
    chunk: int = 2048
    block: int = 16384
    max_pairs: int = 1 << 24


# θ per foundation model as used by the authors' code (project method notes §4); chunk as above.
DEFAULT_PSC_CONFIGS: dict[str, PSCConfig] = {
    "clip": PSCConfig(threshold=0.9),
    "siglip": PSCConfig(threshold=0.9),
    "dinov2": PSCConfig(threshold=0.75),
    "seem": PSCConfig(threshold=0.9999),
    "llama3": PSCConfig(threshold=0.98),
    "llamav": PSCConfig(threshold=0.65),
}


@dataclass
class PSCResult:
    """components: [t, d] float32 raw kept rows; indices: [t] int64 ascending row indices into the input;
    n_input: N (zero rows included); reduction_ratio: N / t (how many times smaller the bank is)."""

    components: torch.Tensor
    indices: torch.Tensor
    n_input: int
    reduction_ratio: float


def exact_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference similarity of paired rows a [P, d], b [P, d] (any float dtype) -> [P] float64."""
    a64, b64 = a.double(), b.double()
    a64 = a64 / torch.linalg.vector_norm(a64, dim=1, keepdim=True)
    b64 = b64 / torch.linalg.vector_norm(b64, dim=1, keepdim=True)
    return (a64 * b64).sum(-1)


def screening_margin(d: int) -> float:
    """Bound δ on |float32 screening similarity − exact similarity| for unit rows of dimension d.

    A float32 dot product of length d errs by at most ~d·u (u = 2⁻²⁴) for unit vectors; normalisation and the rounding of
    float64 inputs to float32 add a few u. Twice that, plus a floor, is a safe margin.
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


class _Pool:
    """The valid (non-zero) rows on the compute device.

    rows: [M, d] raw rows (float16 kept as float16, anything else as float32); inv: [M] float32 1/‖row‖;
    idx: [M] global row indices (device); pos: [N] int64 CPU map global index -> pool position (-1 if absent).
    """

    def __init__(self, rows: _Rows, block: int, device: torch.device):
        store = torch.float16 if rows.dtype == torch.float16 else torch.float32
        self.rows = torch.empty(rows.n, rows.d, dtype=store, device=device)
        self.inv = torch.empty(rows.n, dtype=torch.float32, device=device)
        valid = torch.zeros(rows.n, dtype=torch.bool)
        m = 0
        for s in range(0, rows.n, block):
            x = rows.block(s, min(s + block, rows.n)).to(device)
            norm = torch.linalg.vector_norm(x.double(), dim=1)
            if not torch.isfinite(norm).all():
                raise ValueError(f"features contain non-finite values in rows [{s}, {s + x.shape[0]})")
            ok = norm > 0
            k = int(ok.sum())
            self.rows[m:m + k] = x[ok]
            self.inv[m:m + k] = (1.0 / norm[ok]).float()
            valid[s:s + x.shape[0]] = ok.cpu()
            m += k
        self.valid = valid
        self.idx = torch.nonzero(valid).squeeze(1).to(device)
        self.rows, self.inv = self.rows[:m], self.inv[:m]
        self.pos = torch.full((rows.n,), -1, dtype=torch.int64)
        self.pos[valid] = torch.arange(m)
        self.block, self._buffer = block, None

    def block32(self, start: int, stop: int) -> torch.Tensor:
        """Raw pool rows [start, stop) as float32 [stop - start, d], converted into a reused buffer if stored as float16."""
        if self.rows.dtype == torch.float32:
            return self.rows[start:stop]
        if self._buffer is None:  # one allocation: a fresh float32 block per pass costs more than the conversion
            self._buffer = torch.empty(self.block, self.rows.shape[1], device=self.rows.device)
        return self._buffer[: stop - start].copy_(self.rows[start:stop])

    def unit(self, global_idx: torch.Tensor) -> torch.Tensor:
        """Normalised float32 rows for global indices [P] (CPU int64) -> [P, d] on the device."""
        p = self.pos[global_idx].to(self.rows.device)
        return self.rows[p].float() * self.inv[p, None]


class _Greedy:
    """State of one run: used / rejected flags [N] (CPU bool) and the thresholds."""

    def __init__(self, rows: _Rows, cfg: PSCConfig, device: torch.device):
        self.rows, self.cfg = rows, cfg
        self.theta = float(cfg.threshold)
        self.delta = screening_margin(rows.d)
        if not 0.0 < self.theta < 1.0 - self.delta:
            raise ValueError(f"threshold must lie in (0, {1 - self.delta:.6f}); use e.g. 0.9999 for exact duplicates")
        self.pool = _Pool(rows, cfg.block, device)
        self.used = torch.zeros(rows.n, dtype=torch.bool)
        # Zero rows count as decided: never candidates, and absent from the pool, so never anyone's neighbour.
        self.rejected = ~self.pool.valid
        self.kept: list[int] = []

    def exact_at_least(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[P] bool: exact s(a_p, b_p) ≥ θ for paired global indices a, b [P] (CPU int64)."""
        out = torch.empty(a.numel(), dtype=torch.bool)
        for s in range(0, a.numel(), _EXACT_PAIRS):
            e = s + _EXACT_PAIRS
            out[s:e] = exact_cosine(self.rows.gather(a[s:e]), self.rows.gather(b[s:e])) >= self.theta
        return out

    def decide(self, sims: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact s ≥ θ for pairs with float32 screening values sims [P] (CPU) and global indices a, b [P]."""
        hit = sims >= self.theta + self.delta
        band = (sims > self.theta - self.delta) & ~hit
        if band.any():
            hit[band] = self.exact_at_least(a[band], b[band])
        return hit

    def run(self) -> torch.Tensor:
        """Walk all rows, one window of ``chunk`` open rows at a time; returns kept row indices [t] int64 ascending."""
        cursor = 0
        while True:
            open_rows = torch.nonzero(~(self.used[cursor:] | self.rejected[cursor:])).squeeze(1)
            if open_rows.numel() == 0:
                break
            window = open_rows[: self.cfg.chunk] + cursor
            self.step(window)
            cursor = int(window[-1]) + 1
        return torch.tensor(self.kept, dtype=torch.int64)

    def step(self, window: torch.Tensor) -> None:
        """Decide every row of window [w] (open rows, ascending)."""
        w = window.numel()
        q = self.pool.unit(window)
        sure = ((q @ q.T) >= self.theta + self.delta).cpu().numpy()
        # Leaders: rows no earlier leader certainly covers. last_cover[y]: the latest leader before y covering y (-1: none).
        # A covered row is used as soon as one of its covering leaders is kept, so it needs no evaluation then.
        last_cover = np.full(w, -1)
        after = np.arange(w)
        for e in range(w):
            if last_cover[e] < 0:
                last_cover = np.where(sure[e] & (after > e), e, last_cover)
        hit_used, members = {}, {}
        pending = np.nonzero(last_cover < 0)[0]
        rows = window.tolist()
        p = 0
        while p < w:
            self.evaluate(window, q, pending, hit_used, members)
            p = self.walk(rows, p, hit_used, members)
            if p < w:
                # Row p is open and unevaluated. Evaluate every such row whose covering leaders are all decided, topped up
                # with the next open rows: one pass costs about the same for 1 or _MIN_BATCH rows.
                left = np.arange(p, w)
                todo = left[~self.used[window[p:]].numpy() & np.array([i not in hit_used for i in range(p, w)])]
                ready = last_cover[todo] < p
                extra = todo[~ready][: max(0, _MIN_BATCH - int(ready.sum()))]
                pending = np.union1d(todo[ready], extra)

    def walk(self, rows: list, p: int, hit_used: dict, members: dict) -> int:
        """Algorithm 1 over window rows from position p while their facts are known; returns where it stopped."""
        for p in range(p, len(rows)):
            row = rows[p]
            if self.used[row]:
                continue
            if p not in hit_used:
                return p
            if hit_used[p] or self.used[members[p]].any():
                self.rejected[row] = True
            else:
                self.kept.append(row)
                self.used[members[p]] = True
        return len(rows)

    def evaluate(self, window, q, positions: np.ndarray, hit_used: dict, members: dict) -> None:
        """Record the facts of window rows at positions [k] (a prefix of them, within the pair cap) in the dicts."""
        pos = torch.from_numpy(positions)
        hit, lists, n_done = self.neighbourhoods(window[pos], q[pos.to(q.device)])
        for k in range(n_done):
            hit_used[int(pos[k])] = bool(hit[k])
            members[int(pos[k])] = lists[k]

    def neighbourhoods(self, cand: torch.Tensor, qc: torch.Tensor):
        """Similarity pass of rows cand [m] (unit rows qc [m, d]) against all valid rows, in column blocks.

        Returns hit_used [m'] bool (a neighbour is already used), members: m' tensors of neighbours among the unused rows,
        and m' ≤ m, the evaluated prefix kept within the ``max_pairs`` cap.
        """
        pool, m = self.pool, cand.numel()
        used_col = self.used[pool.idx.cpu()]
        hit_used = torch.zeros(m, dtype=torch.bool)
        rs, gs, n_pairs = [], [], 0
        for s in range(0, pool.idx.numel(), self.cfg.block):
            e = min(s + self.cfg.block, pool.idx.numel())
            sims = (pool.block32(s, e) @ qc[:m].T) * pool.inv[s:e, None]  # [b, m]: this orientation is the faster one
            c, r = torch.nonzero(sims > self.theta - self.delta, as_tuple=True)
            r, c, sim = r.cpu(), c.cpu(), sims[c, r].cpu()
            g = pool.idx[s:e].cpu()[c]
            hit = self.decide(sim, cand[r], g)
            r, g, on_used = r[hit], g[hit], used_col[s:e][c[hit]]
            hit_used[r[on_used]] = True
            rs.append(r[~on_used])
            gs.append(g[~on_used])
            n_pairs += int((~on_used).sum())
            if n_pairs > self.cfg.max_pairs and m > 1:  # keep the prefix of rows whose lists fit
                counts = torch.bincount(torch.cat(rs), minlength=m).cumsum(0)
                m = max(1, int((counts <= self.cfg.max_pairs).sum()))
                rs, gs = [x[x < m] for x in rs], [y[x < m] for x, y in zip(rs, gs)]
                n_pairs = sum(x.numel() for x in rs)
        r, g = torch.cat(rs), torch.cat(gs)
        order = torch.argsort(r, stable=True)
        members = torch.split(g[order], torch.bincount(r, minlength=m).tolist())
        return hit_used[:m], members, m


def principal_scene_components(features, cfg: PSCConfig, device=None) -> PSCResult:
    """Principal scene components of raw features [N, d] (torch tensor, numpy array or float16 memmap).

    device: where the similarity work runs (default: the tensor's device, CPU for numpy input).
    Returns PSCResult(components [t, d] float32 raw rows, indices [t] int64 ascending, n_input N, reduction_ratio N / t).
    """
    rows = _Rows(features)
    device = torch.device(device) if device is not None else rows.device
    with _full_fp32_matmul(), torch.no_grad():
        indices = _Greedy(rows, cfg, device).run()
    components = rows.gather(indices).float()
    t = indices.numel()
    return PSCResult(components, indices, rows.n, rows.n / t if t else float("inf"))
