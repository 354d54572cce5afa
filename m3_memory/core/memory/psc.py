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
exactly the same rows with far less work. Kept rows' neighbourhoods are disjoint (a row is kept only if none of its
neighbours is used), so the used rows are partitioned among the kept rows: ``members[b]`` lists kept row b's
neighbourhood, and a row i in it lies within arccos θ of b. Hence a row p can only have a used neighbour in members[b]
if s(p, b) ≥ 2θ² − 1 (triangle inequality on the sphere), and such a neighbour almost always lies in the
neighbourhood of one of p's few most similar kept rows. Rows are walked in windows of the next ``chunk`` unused rows:

  * one [w, t] product against the kept rows gives each window row its nearby kept rows; a used neighbour is searched
    in their member lists (most similar first; large lists in slices, rim first). A neighbour found rejects the row.
  * a window row's similarities with the whole window (which rows it covers, which may share a neighbour with it)
    are computed only for the rows that need them: kept rows, rows chosen for a pass, rows near an unmarked kept row;
  * a row with no used neighbour (proven: no nearby kept row, or compared with all rows in a pass) is kept; if it may
    share a neighbour with a kept row of this window that is not marked yet, and no window row is a common neighbour,
    a pass settles it. A pass is one product of all rows (column blocks of ``block``) with the kept rows to mark and
    up to ``batch`` open rows ahead, chosen as if each were kept (skipping rows that share a window neighbour with a
    row to mark or an earlier chosen one): it marks the former, and gives each of the latter "a neighbour is used" and
    its neighbourhood, so a later-kept one is marked without another pass. After new marks, open rows near them are
    tested against the new member lists.
  * so full passes are about (kept + rejected rows without a nearby witness) / batch, and the rest of the work is
    (window rows) × (members of their nearby kept rows) · d;
  * decisions are screened in float32 with a worst-case rounding bound δ; pairs within δ of θ are recomputed in float64.
    Unit rows are made on the fly, a block or a gathered set at a time, from the raw rows and their norms (products
    of raw float32 rows, scaled afterwards; rows of float64 or extreme magnitude are normalised exactly per block).

Memory: O(N) flags, norms and owner indices, member lists (at most N indices) and O(chunk · (block + batch)) work;
no copy of the input (a numpy array or memmap is read in place).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Largest number of row pairs recomputed in float64 at once.
_EXACT_PAIRS = 65536
# Bank rows per open row whose neighbourhoods are searched first for a used neighbour.
_FIRST_OWNERS = 4
# Window rows searched for a used neighbour at a time, ahead of the walk.
_LOOKAHEAD = 1024
# Most entries of one masked product testing several small neighbourhoods at once.
_GROUP_ENTRIES = 1 << 16  # small: its columns are wasted on the rows of the other neighbourhoods
# Members of a large neighbourhood tested at a time (rows that found a neighbour drop out).
_SLICE = 256
# Window positions whose open rows' similarity rows are computed together when a pass chooses its rows.
_PREFETCH = 64
# Multiply-adds of a product below which it stays on one thread: switching the thread team costs more than it saves
# (much more when other processes hold the cores).
_THREADED_WORK = 1 << 28


@dataclass(frozen=True)
class PSCConfig:
    """Per-model settings of Algorithm 1.

    threshold: cosine θ above which a row joins a component (CLIP ~0.9, DINOv2 ~0.75, SEEM 0.9999, ...).
    chunk: rows per window (its [chunk, chunk] self-similarity is held at once).
    block: rows per column block of a pass over all rows; work memory is about batch × block float32.
    batch: most open rows compared with all N rows in one pass (their neighbourhoods, at most block × batch
      indices in all, are kept until those rows are decided).
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

    A float32 dot product of length d errs by at most ~d·u (u = 2⁻²⁴) for unit vectors (relative to ‖r‖ when a raw
    float32 row is multiplied and the result scaled by 1 / ‖r‖); forming the float32 unit rows or rounding the scale
    adds a few u. Twice that, plus a floor, is a safe margin.
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


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """On CPU, run the walk's many small ops on one thread (a thread team costs more than they do, far more on a
    loaded machine); yields the caller's thread count, for the large products of a pass (_Greedy.product)."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


class _Rows:
    """Read access to features [N, d]: a torch tensor, or a numpy array / memmap viewed as one without a copy (a
    memmap's pages are read as blocks are used, never loaded at once)."""

    def __init__(self, features):
        if isinstance(features, np.ndarray):
            if features.ndim == 2 and min(features.strides) < 0:
                features = np.ascontiguousarray(features)  # torch views only non-negative strides
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only arrays: nothing is written through the view
                features = torch.from_numpy(features)
        elif not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor or numpy array, got {type(features).__name__}")
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}")
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be floating point, got {features.dtype}")
        self.data = features  # read only under torch.no_grad (principal_scene_components)
        self.dtype, self.device = features.dtype, features.device
        self.n, self.d = int(features.shape[0]), int(features.shape[1])

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) -> [stop - start, d] in the input dtype, on the input's device (a view)."""
        return self.data[start:stop]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx [P] (int64) -> [P, d] in the input dtype, on the input's device."""
        return self.data.index_select(0, idx.to(self.device))  # far faster than advanced indexing on CPU


class _Greedy:
    """One run of Algorithm 1 over all rows, addressed by their index 0..N-1.

    threads: CPU threads for the products of a pass. scale: [N] float32 on the device, 1 / ‖r_i‖ (0 for zero rows),
    so that unit rows are made block by block from the raw ones (None: rows whose dtype or magnitude float32 cannot
    scale safely, normalised exactly per block instead, see unit_rows);
    owner: [N] int64 on the device, the bank position of the kept row whose neighbourhood holds the row (-1: unused,
    -2: a zero row, which takes no part); banks: the kept rows' unit rows in pieces, in bank order; members[b]: the
    rows of bank row b's neighbourhood.
    """

    def __init__(self, rows: _Rows, cfg: PSCConfig, device: torch.device, threads: int = 1):
        self.rows, self.cfg, self.threads, self.device = rows, cfg, threads, device
        self.theta = float(cfg.threshold)
        self.delta = screening_margin(rows.d)
        if not 0.0 < self.theta < 1.0 - self.delta:
            raise ValueError(f"threshold must lie in (0, {1 - self.delta:.6f}); use e.g. 0.9999 for exact duplicates")
        # Two rows with a common neighbour are within angle 2·arccos θ, i.e. s ≥ 2θ² − 1; 2δ covers screening error.
        self.near = 2.0 * self.theta**2 - 1.0 - 2.0 * self.delta
        valid = torch.empty(rows.n, dtype=torch.bool, device=device)
        norms = torch.ones(rows.n, dtype=torch.float64, device=device)
        for s in range(0, rows.n, cfg.block):
            x = rows.block(s, min(s + cfg.block, rows.n)).to(device)
            if not torch.isfinite(x).all():
                raise ValueError(f"features contain non-finite values in rows [{s}, {s + x.shape[0]})")
            valid[s:s + x.shape[0]] = (x != 0).any(dim=1)
            if x.dtype != torch.float64:  # squares of float16/32 values never overflow or underflow float64
                norms[s:s + x.shape[0]] = torch.linalg.vector_norm(x.double(), dim=1)
        self.owner = torch.where(valid, -1, -2)
        # Products of raw float32 rows scaled afterwards are as exact as products of unit rows while norms stay in
        # [2^-60, 2^60] (no overflow, no subnormal scale factors).
        self.scale = None
        if rows.dtype != torch.float64 and bool(((norms >= 2.0**-60) & (norms <= 2.0**60) | ~valid).all()):
            self.scale = torch.where(valid, 1.0 / norms, 0.0).float()
        self.banks: list[torch.Tensor] = []
        self.members: list[torch.Tensor] = []
        self.kept: list[int] = []

    def unit(self, idx: torch.Tensor) -> torch.Tensor:
        """Unit rows idx [P] (device int64) -> [P, d] float32 on the device."""
        x = self.rows.gather(idx).to(self.device)
        return unit_rows(x).float() if self.scale is None else x.float() * self.scale.index_select(0, idx)[:, None]

    def block_sims(self, start: int, stop: int, q: torch.Tensor) -> torch.Tensor:
        """Screening similarities of rows [start, stop) with unit rows q [c, d] -> [stop - start, c] float32."""
        x = self.rows.block(start, stop).to(self.device)
        if self.scale is None:
            return self.product(unit_rows(x).float(), q)
        return self.product(x.float(), q) * self.scale[start:stop, None]

    def pairs(self, sims: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """Exact s ≥ θ for screening values sims [P, Q] of rows a [P] × b [Q] (device tensors), sparse: returns
        (i [H], j [H], sims[i, j]) over the pairs that pass; only pairs within δ of θ are recomputed in float64."""
        low = self.theta - self.delta
        if sims.numel() == 0:
            i = j = torch.zeros(0, dtype=torch.int64, device=sims.device)
            return i, j, sims.new_zeros(0)
        # Rows with any candidate are few; a row maximum is far cheaper than comparing and listing every entry.
        cand = torch.nonzero(sims.amax(dim=1) > low).squeeze(1)
        sub = sims.index_select(0, cand)
        i, j = torch.nonzero(sub > low, as_tuple=True)
        v = sub[i, j]
        i = cand[i]
        keep = v >= self.theta + self.delta
        band = torch.nonzero(~keep).squeeze(1)
        for s in range(0, band.numel(), _EXACT_PAIRS):
            k = band[s:s + _EXACT_PAIRS]
            keep[k] = exact_cosine(self.rows.gather(a[i[k]]), self.rows.gather(b[j[k]])).to(keep.device) >= self.theta
        return i[keep], j[keep], v[keep]

    def at_least(self, sims: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Exact s ≥ θ for screening values sims [P, Q] of rows a [P] × b [Q] (device tensors) -> [P, Q] bool."""
        hit = torch.zeros(sims.shape, dtype=torch.bool, device=sims.device)
        i, j, _ = self.pairs(sims, a, b)
        hit[i, j] = True
        return hit

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [P, d] @ b [Q, d]ᵀ -> [P, Q], on the caller's CPU threads when large enough (see _single_thread)."""
        if self.threads == 1 or a.device.type != "cpu" or a.shape[0] * b.shape[0] * a.shape[1] < _THREADED_WORK:
            return a @ b.T
        torch.set_num_threads(self.threads)
        try:
            return a @ b.T
        finally:
            torch.set_num_threads(1)

    def any_at_least(self, sims: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """at_least(sims, a, b).any(dim=1) -> [P] bool, exact; only rows whose largest value is uncertain go further."""
        top = sims.amax(dim=1)
        out = top >= self.theta + self.delta
        unsure = torch.nonzero(~out & (top > self.theta - self.delta)).squeeze(1)
        if unsure.numel():
            out[unsure] = self.at_least(sims.index_select(0, unsure), a[unsure], b).any(dim=1)
        return out

    def run(self) -> torch.Tensor:
        """Walk all rows, one window of ``chunk`` unused rows at a time; returns kept row indices [t] ascending."""
        n, cursor, step = self.rows.n, 0, 4 * self.cfg.chunk
        while cursor < n:
            found = []  # unused rows from cursor on, read in pieces rather than one scan of the tail per window
            n_found = 0
            while cursor < n and n_found < self.cfg.chunk:
                piece = torch.nonzero(self.owner[cursor:cursor + step] == -1).squeeze(1) + cursor
                found.append(piece)
                n_found += piece.numel()
                cursor = min(cursor + step, n)
            window = torch.cat(found)[: self.cfg.chunk] if found else torch.empty(0, dtype=torch.int64)
            if window.numel() == 0:
                break
            cursor = int(window[-1]) + 1
            self.window(window)
        return torch.sort(torch.tensor(self.kept, dtype=torch.int64)).values

    def window(self, window: torch.Tensor) -> None:
        """Decide every row of window [w] (unused rows, ascending, on the device), in order.

        Per row p: hit[p] is true only where p is known to have a used neighbour; exhausted[p] says hit[p] is exact
        up to the neighbourhoods marked since (``fresh``), which a refresh checks through their member lists.
        """
        w = window.numel()
        q = self.unit(window)
        near_bank, top = self.against_bank(q)
        hit = np.zeros(w, dtype=bool)
        checked = ~near_bank  # rows whose top kept rows' neighbourhoods were searched (or that have none)
        sim_rows = _WindowRows(self, q, window)
        exhausted = ~near_bank  # no kept row within 2·arccos θ of p when the window opened: no used neighbour then
        closed = (self.owner[window] >= 0).cpu().numpy()  # used, rejected or kept
        covered = np.zeros(w, dtype=bool)  # a neighbour of a row kept in this window
        pending: list[int] = []  # kept window positions whose neighbourhood is not yet marked used
        near_pending = np.zeros(w, dtype=bool)  # near some pending row
        fresh: list[tuple[int, int]] = []  # (window position, bank position) marked since hit was last refreshed
        near_fresh = np.zeros(w, dtype=bool)  # near some fresh row
        known: dict[int, torch.Tensor] = {}  # window position -> its neighbourhood (rows), from a pass
        p = 0
        while p < w:
            if closed[p] or hit[p] or covered[p]:
                closed[p] = True
                p += 1
                continue
            if not checked[p]:
                self.check_ahead(q, window, p, top, hit, checked, closed)
                continue
            clash = [k for k in pending if sim_rows.near(k)[p]] if near_pending[p] else []
            if any((sim_rows.cover(k) & sim_rows.cover(p)).any() for k in clash):
                closed[p] = True  # a window row is a neighbour of both p and an unmarked kept row
                p += 1
                continue
            if near_fresh[p]:
                self.refresh(q, window, p, fresh, hit, closed, sim_rows)
                fresh = []
                near_fresh[:] = False
                continue
            if clash or not exhausted[p]:
                self.pass_(q, window, p, pending, hit, exhausted, closed, sim_rows, known, checked, top)
                fresh += [(k, len(self.members) - len(pending) + i) for i, k in enumerate(pending)]
                near_fresh |= near_pending
                pending = []
                near_pending[:] = False
                continue
            closed[p] = True
            covered |= sim_rows.cover(p)
            if p in known:  # its neighbourhood is already known: mark it now
                fresh.append((p, len(self.members)))
                near_fresh |= sim_rows.near(p)
                self.add(window[p:p + 1], [known.pop(p)])
            else:
                pending.append(p)
                near_pending |= sim_rows.near(p)
            p += 1
        if pending:
            self.scan(window[pending], window[:0])

    def refresh(self, q, window, p: int, fresh, hit, closed, sim_rows: "_WindowRows") -> None:
        """Test the open rows from p on against the neighbourhoods marked since the last refresh (hit in place)."""
        closed |= (self.owner[window] >= 0).cpu().numpy()
        rest = np.nonzero(~closed & ~hit)[0]
        rest = rest[rest >= p]
        ks = [k for k, _ in fresh]
        f, r = np.nonzero(np.stack([sim_rows.near(k)[rest] for k in ks]))
        if f.size:
            banks = np.asarray([b for _, b in fresh])[f]
            pairs = torch.from_numpy(np.stack([rest[r], banks])).to(q.device)
            hit[rest[r][self.owned_hits(q, window, pairs).cpu().numpy()]] = True

    def pass_(self, q, window, p, pending: list[int], hit, exhausted, closed, sim_rows: "_WindowRows", known, checked,
              top):
        """One pass: mark the kept rows pending, and compare p and the next searched open rows likely to be kept with
        all rows, skipping those that share a window neighbour with a pending or earlier chosen row (rejected if that
        one is kept); updates hit, exhausted, closed, known in place."""
        todo, covered = [], np.zeros(closed.size, dtype=bool)
        for k in pending:
            covered |= sim_rows.cover(k)
        for j in range(p, closed.size):
            if len(todo) == self.cfg.batch:
                break
            if not checked[j]:
                self.check_ahead(q, window, j, top, hit, checked, closed)
            if closed[j] or hit[j] or covered[j] or j in known:
                continue
            if not sim_rows.has(j):  # one product for the candidates of the next stretch
                ahead = np.nonzero(~(closed | hit | covered)[j:j + _PREFETCH])[0] + j
                sim_rows.prefetch(ahead.tolist())
            if not (sim_rows.cover(j) & covered).any():
                todo.append(j)
                covered |= sim_rows.cover(j)
        todo = np.asarray(todo, dtype=np.int64)
        hit_used, members = self.scan(window[pending], window[todo], keep_members=True)
        hit[todo] |= hit_used
        exhausted[todo] = True
        if members is not None:
            known.update(zip(todo.tolist(), members))
        closed |= (self.owner[window] >= 0).cpu().numpy()

    def against_bank(self, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Rows q [w] against the kept rows marked so far -> near_bank [w] bool (some kept row within 2·arccos θ) and
        top [w, m] int64: the bank positions of each row's m most similar kept rows within that angle (-1: none),
        most similar first. Their neighbourhoods are where a used neighbour of the row almost always lies."""
        w = q.shape[0]
        if not self.banks:
            return np.zeros(w, dtype=bool), np.full((w, 0), -1)
        bank = torch.cat(self.banks)
        top_s, top_b = [], []
        for c in range(0, bank.shape[0], self.cfg.block):
            sims = q @ bank[c:c + self.cfg.block].T
            s, b = sims.topk(min(_FIRST_OWNERS, sims.shape[1]), dim=1)
            top_s.append(s)
            top_b.append(b + c)
        s, b = torch.cat(top_s, 1), torch.cat(top_b, 1)
        s, order = s.topk(min(_FIRST_OWNERS, s.shape[1]), dim=1)
        b = torch.where(s >= self.near, b.gather(1, order), -1).cpu().numpy()
        return b[:, 0] >= 0, b

    def check_ahead(self, q, window, p: int, top, hit, checked, closed) -> None:
        """Search the open rows of the next ``_LOOKAHEAD`` window positions from p that are not searched yet (lazily:
        many rows are covered before their turn); flags in place."""
        ahead = np.nonzero(~checked[p:p + _LOOKAHEAD] & ~closed[p:p + _LOOKAHEAD])[0] + p
        self.check(q, window, ahead, top, hit)
        checked[p:p + _LOOKAHEAD] = True

    def check(self, q, window, rows: np.ndarray, top: np.ndarray, hit: np.ndarray) -> None:
        """Look for a used neighbour of window rows rows [r] in the neighbourhoods of their top kept rows, most
        similar first (hit in place)."""
        for rank in range(top.shape[1]):
            rows = rows[~hit[rows] & (top[rows, rank] >= 0)]
            if rows.size == 0:
                break
            pairs = torch.from_numpy(np.stack([rows, top[rows, rank]])).to(q.device)
            hit[rows[self.owned_hits(q, window, pairs).cpu().numpy()]] = True

    def owned_hits(self, q: torch.Tensor, window: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """pairs [2, P] (window position p, bank position b) -> [P] bool: row p has a neighbour
        in b's neighbourhood. Large neighbourhoods are tested in slices, rim first, rows leaving once they found a
        neighbour; small ones together, one product per group masked to its pairs."""
        p, b = pairs
        out = torch.zeros(p.numel(), dtype=torch.bool, device=q.device)
        order = torch.argsort(b, stable=True)
        banks, counts = torch.unique_consecutive(b[order], return_counts=True)
        groups: list[list[int]] = [[]]  # bank positions
        group_pairs: list[list[torch.Tensor]] = [[]]
        size_rows = size_cols = 0
        for bank, idx in zip(banks.tolist(), torch.split(order, counts.tolist())):
            hood = self.members[bank]
            if hood.numel() > _SLICE:
                for s in range(0, hood.numel(), _SLICE):
                    cols = hood[s:s + _SLICE]
                    found = self.any_at_least(q.index_select(0, p[idx]) @ self.unit(cols).T, window[p[idx]], cols)
                    out[idx[found]] = True
                    idx = idx[~found]
                    if idx.numel() == 0:
                        break
                continue
            if groups[-1] and (size_rows + idx.numel()) * (size_cols + hood.numel()) > _GROUP_ENTRIES:
                groups.append([])
                group_pairs.append([])
                size_rows = size_cols = 0
            groups[-1].append(bank)
            group_pairs[-1].append(idx)
            size_rows, size_cols = size_rows + idx.numel(), size_cols + hood.numel()
        for group, pieces in zip(groups, group_pairs):
            if not group:
                continue
            idx = torch.cat(pieces)
            rows = p[idx]
            cols = torch.cat([self.members[bank] for bank in group])
            sims = q.index_select(0, rows) @ self.unit(cols).T
            if len(group) > 1:  # only each row's own bank counts
                sims = sims.masked_fill(b[idx][:, None] != self.owner[cols][None, :], -2.0)
            out[idx] = self.any_at_least(sims, window[rows], cols)
        return out

    def scan(self, mark: torch.Tensor, todo: torch.Tensor, keep_members: bool = False):
        """One pass over all rows in column blocks: add the kept rows mark [k] to the bank and mark their
        neighbourhoods used, and evaluate rows todo [e]. Returns hit_used [e] bool (a neighbour is used, the new marks
        included) and, with keep_members, each todo row's neighbourhood [e tensors] (None if they would exceed
        ``block`` · ``batch`` rows in all)."""
        k, e = mark.numel(), todo.numel()
        rows = torch.cat([mark, todo])
        q = self.unit(rows)
        hit_used = torch.zeros(e, dtype=torch.bool, device=q.device)
        found, todo_found = [], []
        n_pairs, budget = 0, self.cfg.block * self.cfg.batch
        for s in range(0, self.rows.n, self.cfg.block):
            stop = min(s + self.cfg.block, self.rows.n)
            r, c, v = self.pairs(self.block_sims(s, stop, q), torch.arange(s, stop, device=q.device), rows)
            r += s
            if k:
                m = c < k  # neighbourhoods of kept rows are disjoint
                self.owner[r[m]] = c[m] + len(self.members)
                found.append((r[m], c[m], v[m]))
            if e:
                m = c >= k
                r, c, v = r[m], c[m] - k, v[m]
                hit_used[c[self.owner[r] >= 0]] = True
                if keep_members and n_pairs <= budget:
                    todo_found.append((r, c, v))
                    n_pairs += r.numel()
        if k:
            self.add(mark, self.group(found, k), q[:k])
        if not keep_members:
            return hit_used.cpu().numpy()
        return hit_used.cpu().numpy(), self.group(todo_found, e) if n_pairs <= budget else None

    def group(self, found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int) -> list[torch.Tensor]:
        """Pieces (rows [P], column [P] in 0..n-1, similarity [P]) -> per column its rows, least similar first (a
        neighbourhood's rim, where neighbours of rows outside it lie)."""
        if not found:
            return [torch.zeros(0, dtype=torch.int64, device=self.owner.device)] * n
        rows, column, sims = (torch.cat(x) for x in zip(*found))
        order = torch.argsort(sims, stable=True)
        order = order[torch.argsort(column[order], stable=True)]
        return list(torch.split(rows[order], torch.bincount(column, minlength=n).tolist()))

    def add(self, rows: torch.Tensor, neighbourhoods: list[torch.Tensor], unit: torch.Tensor | None = None) -> None:
        """Append kept rows [k] with their neighbourhoods to the bank; mark those used."""
        for hood in neighbourhoods:
            self.owner[hood] = len(self.members)
            self.members.append(hood)
        self.banks.append(self.unit(rows) if unit is None else unit)
        self.kept.extend(rows.tolist())


class _WindowRows:
    """Similarities of single window rows with the whole window q [w, d], computed when first asked for: only kept,
    chosen and clashing rows need theirs, far fewer than the w rows of a [w, w] product."""

    def __init__(self, greedy: _Greedy, q: torch.Tensor, window: torch.Tensor):
        self.greedy, self.q, self.window = greedy, q, window
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def prefetch(self, ks: list[int]) -> None:
        """Compute the rows of window positions ks in one product."""
        ks = [k for k in ks if k not in self.rows]
        if not ks:
            return
        idx = torch.tensor(ks, dtype=torch.int64, device=self.q.device)
        sims = self.q.index_select(0, idx) @ self.q.T
        cover = self.greedy.at_least(sims, self.window[idx], self.window).cpu().numpy()
        near = (sims >= self.greedy.near).cpu().numpy()
        for i, k in enumerate(ks):
            self.rows[k] = cover[i], near[i]

    def has(self, k: int) -> bool:
        return k in self.rows

    def _row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.rows:
            self.prefetch([k])
        return self.rows[k]

    def cover(self, k: int) -> np.ndarray:
        """[w] bool: s(k, j) ≥ θ exactly (window rows j that k covers)."""
        return self._row(k)[0]

    def near(self, k: int) -> np.ndarray:
        """[w] bool: k and j may share a neighbour (s ≥ 2θ² − 1 up to screening error)."""
        return self._row(k)[1]


def principal_scene_components(features, cfg: PSCConfig, device=None) -> PSCResult:
    """Principal scene components of raw features [N, d] (torch tensor, numpy array or float16 memmap).

    device: where the similarity work runs (default: the tensor's device, CPU for numpy input).
    Returns PSCResult(components [t, d] raw rows, indices [t] int64 ascending, n_input N, reduction_ratio N / t).
    """
    rows = _Rows(features)
    device = torch.device(device) if device is not None else rows.device
    with _full_fp32_matmul(), _single_thread(device) as threads, torch.no_grad():
        greedy = _Greedy(rows, cfg, device, threads)
        indices = greedy.run()
    components = rows.gather(indices).cpu()
    components = components.double() if rows.dtype == torch.float64 else components.float()
    t = indices.numel()
    return PSCResult(components, indices, rows.n, rows.n / t if t else float("inf"))
