"""Principal scene components: the fast cover must keep exactly the rows the naive greedy cover keeps."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3_memory.core.memory import psc
from m3_memory.core.memory.psc import PSCConfig, exact_cosine, principal_scene_components


def naive_psc(features: torch.Tensor, threshold: float, chunk: int) -> torch.Tensor:
    """The plain blockwise float64 form of Algorithm 1: features [N, d] -> kept indices [t]. Zero rows never take part.

    Normalise every row (scaled by a power of two first, which is exact, so huge finite rows do not overflow), then per
    chunk of rows one [chunk, N] float64 similarity block and the greedy walk row by row.
    """
    r64 = features.double().numpy()
    peak = np.abs(r64).max(axis=1, keepdims=True)
    valid = peak[:, 0] > 0
    scaled = r64 * 2.0 ** -np.frexp(np.where(valid[:, None], peak, 1.0))[1]
    unit = scaled / np.where(valid, np.linalg.norm(scaled, axis=1), 1.0)[:, None]
    used = ~valid
    kept = []
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T
        for j in range(start, min(start + chunk, len(unit))):
            if used[j]:
                continue
            similar = (sims[j - start] >= threshold) & valid
            if not used[similar].any():
                kept.append(j)
                used[similar] = True
    return torch.tensor(kept, dtype=torch.int64)


def clustered(n: int, d: int, k: int, noise: float, seed: int) -> torch.Tensor:
    """[n, d] features: k random centres, each row = its centre + noise of a random scale in [0, 2·noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    scale = 2 * noise * torch.rand(n, 1, generator=g)
    return centres[labels] + scale * torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    ("threshold", "noise", "chunk", "block"),
    [
        (0.5, 0.5, 256, 1000),
        (0.75, 0.35, 64, 333),
        (0.8, 0.7, 2048, 4096),
        (0.9, 0.35, 100, 50),
        (0.9, 0.7, 500, 1000),
        (0.98, 0.1, 300, 700),
    ],
)
def test_matches_naive_on_clustered_data(threshold, noise, chunk, block):
    features = clustered(1500, 32, 25, noise, seed=int(threshold * 100))
    expected = naive_psc(features, threshold, chunk=500)
    result = principal_scene_components(features, PSCConfig(threshold, chunk=chunk, block=block))
    assert 1 < len(expected) < len(features)  # the case is neither trivial nor degenerate
    assert torch.equal(result.indices, expected)
    assert torch.equal(result.components, features[expected])
    assert result.n_input == 1500 and result.reduction_ratio == pytest.approx(1500 / len(expected))


@pytest.mark.parametrize(("chunk", "block", "batch"), [(1, 97, 128), (300, 7, 128), (400, 128, 1), (5, 600, 2)])
def test_extreme_chunk_block_and_batch(chunk, block, batch):
    features = clustered(600, 16, 12, 0.8, seed=3)
    expected = naive_psc(features, 0.85, chunk=100)
    cfg = PSCConfig(0.85, chunk=chunk, block=block, batch=batch)
    assert torch.equal(principal_scene_components(features, cfg).indices, expected)


@pytest.mark.parametrize(("threshold", "noise", "k"), [(0.9, 0.3, 4), (0.7, 0.6, 5)])
def test_large_neighbourhoods(threshold, noise, k):
    # A few wide clusters: the first kept rows own hundreds of rows, searched in slices for a used neighbour.
    features = clustered(3000, 16, k, noise, seed=21)
    expected = naive_psc(features, threshold, chunk=1000)
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    assert ((unit[expected] @ unit.T) >= threshold).sum(1).max() > 400
    for chunk in (256, 2048):
        result = principal_scene_components(features, PSCConfig(threshold, chunk=chunk, block=1024))
        assert torch.equal(result.indices, expected)


def _count_pass_columns(monkeypatch) -> list[int]:
    """Rows compared with all N rows by each full pass (the columns of its products)."""
    columns = []
    scan = psc._Greedy.scan

    def counting_scan(self, mark, todo, **kwargs):
        columns.append(mark.numel() + todo.numel())
        return scan(self, mark, todo, **kwargs)

    monkeypatch.setattr(psc._Greedy, "scan", counting_scan)
    return columns


def test_work_scales_with_open_rows(monkeypatch):
    # Rows compared with all N rows (columns of full passes) stay near the number of kept rows, far below N.
    columns = _count_pass_columns(monkeypatch)
    features = clustered(6000, 32, 60, 0.3, seed=12)
    result = principal_scene_components(features, PSCConfig(0.85, chunk=512))
    assert torch.equal(result.indices, naive_psc(features, 0.85, chunk=1000))
    assert len(result.indices) < 6000 // 20
    assert sum(columns) <= 2 * len(result.indices)


@pytest.mark.parametrize(("threshold", "step"), [(0.9, 0.1), (0.8, 0.2)])
def test_chained_neighbourhoods_pass_only_kept_rows(monkeypatch, threshold, step):
    # Smoothly varying rows: consecutive open rows share neighbours, so a pass that evaluated every open row ahead
    # would mostly compute neighbourhoods of rows rejected later (5-12 times the kept rows).
    columns = _count_pass_columns(monkeypatch)
    features = sphere_walk(3000, 32, step, seed=1)
    result = principal_scene_components(features, PSCConfig(threshold, chunk=1024, block=512))
    assert torch.equal(result.indices, naive_psc(features, threshold, chunk=1000))
    assert len(result.indices) > 50
    assert sum(columns) <= 1.5 * len(result.indices)
    assert len(columns) <= 10


def test_duplicates_zero_rows_and_exact_ties():
    # Unit rows whose pairwise cosines are exactly 0.6 or 0.36 in float64, scaled by powers of two (exact), duplicated.
    basis = torch.tensor(
        [[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0.6, 0, 0.8, 0], [0, 0, 0, 1.0], [0, 0.6, 0, 0.8], [0.0, 0, 0, 0]],
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(0)
    pick = torch.randint(0, len(basis), (400,), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (400, 1), generator=g).double()
    features = basis[pick] * scale
    for threshold in (0.36, 0.6, 0.7):
        expected = naive_psc(features, threshold, chunk=50)
        result = principal_scene_components(features, PSCConfig(threshold, chunk=16, block=64))
        assert torch.equal(result.indices, expected)
        assert not (result.components == 0).all(1).any()
    # The ties really are exact: a decision flips when θ moves by one ulp.
    assert exact_cosine(basis[:1], basis[1:2]).item() >= 0.6
    assert exact_cosine(basis[:1], basis[1:2]).item() < np.nextafter(0.6, 1.0)


def test_zero_rows_are_ignored():
    features = clustered(1500, 24, 15, 0.4, seed=5)
    zero = torch.zeros(1500, dtype=torch.bool)
    zero[torch.randperm(1500, generator=torch.Generator().manual_seed(1))[:300]] = True
    features[zero] = 0
    result = principal_scene_components(features, PSCConfig(0.8, chunk=128, block=256))
    assert not zero[result.indices].any()
    # Same cover as on the input without its zero rows, mapped back to the original indices.
    kept_dense = principal_scene_components(features[~zero], PSCConfig(0.8)).indices
    assert torch.equal(result.indices, torch.nonzero(~zero).squeeze(1)[kept_dense])
    assert torch.equal(result.indices, naive_psc(features, 0.8, chunk=300))


def test_all_zero_and_invalid_input():
    empty = principal_scene_components(torch.zeros(10, 4), PSCConfig(0.9))
    assert empty.indices.numel() == 0 and empty.components.shape == (0, 4) and empty.reduction_ratio == float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        principal_scene_components(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), PSCConfig(0.9))
    with pytest.raises(ValueError, match="threshold"):
        principal_scene_components(torch.ones(3, 4), PSCConfig(1.0))
    with pytest.raises(ValueError, match="positive"):
        PSCConfig(0.9, batch=0)


def sphere_walk(n: int, d: int, step: float, seed: int) -> torch.Tensor:
    """[n, d] unit rows of a random walk on the sphere: features that vary smoothly, so neighbourhoods chain."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, d, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    for i in range(n):
        x = x / x.norm()
        rows[i] = x
        x = x + step / d**0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    return rows.float()


@pytest.mark.parametrize(("threshold", "step", "chunk", "batch"), [(0.9, 0.1, 2048, 128), (0.95, 0.05, 200, 16),
                                                                   (0.8, 0.2, 64, 128)])
def test_matches_naive_on_smoothly_varying_rows(threshold, step, chunk, batch):
    features = sphere_walk(2000, 32, step, seed=int(threshold * 100))
    expected = naive_psc(features, threshold, chunk=1000)
    result = principal_scene_components(features, PSCConfig(threshold, chunk=chunk, block=512, batch=batch))
    assert 20 < len(expected) < 1000
    assert torch.equal(result.indices, expected)
    assert torch.equal(result.components, features[expected])


def test_near_threshold_pairs_and_random_rows():
    # Pairs whose float64 cosine is within 1e-9 of θ (inside the float32 screening band), plus unstructured rows.
    g = torch.Generator().manual_seed(4)
    theta = 0.9
    base = torch.nn.functional.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    side = torch.nn.functional.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    side = torch.nn.functional.normalize(side - (side * base).sum(1, keepdim=True) * base, dim=1)
    angle = torch.arccos(torch.tensor(theta, dtype=torch.float64)) + 1e-9 * torch.randn(300, 1, generator=g, dtype=torch.float64)
    partner = torch.cos(angle) * base + torch.sin(angle) * side
    features = torch.cat([torch.stack([base, partner], 1).reshape(600, 16), torch.randn(600, 16, generator=g).double()])
    cosines = exact_cosine(base, partner)
    assert ((cosines >= theta).sum() > 50) and ((cosines < theta).sum() > 50)
    assert ((cosines - theta).abs() < 1e-7).all()
    for chunk in (64, 2048):
        result = principal_scene_components(features, PSCConfig(theta, chunk=chunk, block=256))
        assert torch.equal(result.indices, naive_psc(features, theta, chunk=500))
    assert torch.equal(principal_scene_components(features, PSCConfig(0.5)).indices, naive_psc(features, 0.5, 300))


def test_rows_beyond_float32_norm_range():
    # [3e38, 3e38]-style float32 rows: finite, but their norm overflows float32.
    g = torch.Generator().manual_seed(8)
    directions = torch.rand(400, 2, generator=g) + torch.tensor([0.0, 0.05])
    features = (3e38 * directions / directions.amax(1, keepdim=True)).float()
    features[::7] = torch.tensor([3e38, 3e38])
    features[::11] = torch.tensor([1e-40, 1e-40])  # subnormal rows: the same direction
    assert torch.isfinite(features).all() and torch.isinf(features.norm(dim=1)).any()
    expected = naive_psc(features, 0.999, chunk=100)
    assert 3 < len(expected) < 300
    result = principal_scene_components(features, PSCConfig(0.999, chunk=64, block=100))
    assert torch.equal(result.indices, expected)
    assert torch.equal(result.components, features[expected])
    # float64 rows near 1e39 (beyond float32's range): same cover as the rows scaled down, and finite components.
    big = clustered(500, 8, 6, 0.4, seed=9).double() * 1e39
    result = principal_scene_components(big, PSCConfig(0.9, chunk=128, block=128))
    assert torch.equal(result.indices, naive_psc(big, 0.9, chunk=200))
    assert torch.equal(result.indices, naive_psc(big / 1e39, 0.9, chunk=200))
    assert result.components.dtype == torch.float64 and torch.isfinite(result.components).all()
    assert torch.equal(result.components, big[result.indices])


def test_float16_memmap_input(tmp_path):
    features = clustered(1500, 64, 30, 0.25, seed=7).half()
    path = tmp_path / "features.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=tuple(features.shape))
    mm[:] = features.numpy()
    mm.flush()
    cfg = PSCConfig(0.85, chunk=256, block=512)
    from_disk = principal_scene_components(np.memmap(path, dtype=np.float16, mode="r", shape=mm.shape), cfg)
    expected = naive_psc(features, 0.85, chunk=1000)
    assert 30 <= len(expected) < 1000
    assert torch.equal(from_disk.indices, expected)
    assert torch.equal(from_disk.indices, principal_scene_components(features, cfg).indices)
    assert from_disk.components.dtype == torch.float32
    assert torch.equal(from_disk.components, features[from_disk.indices].float())


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any torch op allocates: outputs that share an input's storage
    (views, detach, torch.from_numpy's wrapping of the array's own memory) do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("as_numpy", [False, True])
def test_memory_is_bounded_by_chunk_and_block(as_numpy):
    n, d, chunk, block, batch = 6000, 64, 128, 256, 64
    features = clustered(n, d, 40, 0.15, seed=11)
    cfg = PSCConfig(0.8, chunk=chunk, block=block, batch=batch)
    expected = naive_psc(features, 0.8, chunk=1000)
    with _LargestOutput() as probe:
        result = principal_scene_components(features.numpy() if as_numpy else features, cfg)
    assert torch.equal(result.indices, expected)
    # No N × d tensor (no normalised copy of the input, not even a view of it): every work tensor is at most a column
    # block against the open rows of a window and a pass. A naive pass would hold chunk × N.
    assert probe.largest <= block * (chunk + batch)
    assert probe.largest < n * d // 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    features = clustered(20000, 128, 60, 0.5, seed=13)
    cfg = PSCConfig(0.85, chunk=1024, block=8192)
    assert torch.equal(
        principal_scene_components(features, cfg, device="cuda").indices,
        principal_scene_components(features, cfg).indices,
    )
