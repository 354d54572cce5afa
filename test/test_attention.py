"""Gaussian memory attention: formula, Wm's start, chunked decoding, gradients, state dict, top-k sparse softmax; the
top-k setting and the distillation baseline's shared latent layout through training and the checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from m3_memory.core.checkpoint import CheckpointError, Memory, load_memory, save_memory
from m3_memory.core.distill import train_distilled
from m3_memory.core.gaussians import GaussianConfig, GaussianModel
from m3_memory.core.memory import FeatureDecoder
from m3_memory.core.memory.attention import MemoryAttention
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import ConfigError, TrainConfig, ViewFeatures
from m3_memory.core.views import TrainingViews
from m3_memory.sim import demo_scene


def bank(t: int = 40, d: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed)) * 3


def test_forward_is_softmax_of_cosine_over_bank():
    psc = bank()
    module = MemoryAttention(8, psc, temperature=0.05, seed=1)
    queries = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    out = module(queries)
    projected = queries @ module.wm
    cos = (projected[:, None, :] * psc[None]).sum(-1) / (projected.norm(dim=1)[:, None] * psc.norm(dim=1)[None])
    expected = torch.softmax(cos / 0.05, dim=1) @ psc
    assert out.shape == (50, 24)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_queries_aligned_with_a_component_decode_to_it():
    psc = F.normalize(torch.eye(6, 6), dim=1) * 5  # orthogonal bank: cosine 1 vs 0 -> weight e^20 : 1
    module = MemoryAttention(6, psc, seed=0)
    # Queries whose projection Q Wm equals a bank row (Wm [6, 6] is invertible almost surely).
    queries = torch.linalg.solve(module.wm.T, psc.T).T
    torch.testing.assert_close(module(queries), psc, rtol=0, atol=1e-6)


def test_wm_is_a_seeded_buffer_or_a_parameter():
    psc = bank()
    fixed = MemoryAttention(8, psc, seed=3)
    assert "wm" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    assert torch.equal(fixed.wm, MemoryAttention(8, psc, seed=3).wm)
    assert not torch.equal(fixed.wm, MemoryAttention(8, psc, seed=4).wm)
    learnable = MemoryAttention(8, psc, seed=3, learnable_wm=True)
    assert [name for name, _ in learnable.named_parameters()] == ["wm"]
    assert torch.equal(learnable.wm.detach(), fixed.wm)


def test_principal_wm_spans_the_banks_subspace():
    """A bank of rank l in d dims: the principal Wm's rows are orthogonal, of the random rows' norm √(d/l), and keep
    all of every unit bank row, where a random Wm keeps about √(l/d) of it; the same start whatever the seed, fixed or
    learnable."""
    l, d = 6, 24
    generator = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(d, l, generator=generator))   # [d, l]
    psc = torch.randn(40, l, generator=generator) @ basis.T
    principal = MemoryAttention(l, psc, wm_init="principal", seed=0)
    torch.testing.assert_close(principal.wm @ principal.wm.T, torch.eye(l) * d / l, rtol=0, atol=1e-4)

    def kept(module: MemoryAttention) -> torch.Tensor:
        """|projection of each unit bank row onto Wm's row space| [t]."""
        rows, _ = torch.linalg.qr(module.wm.T)
        return (F.normalize(module.psc, dim=1) @ rows).norm(dim=1)

    torch.testing.assert_close(kept(principal), torch.ones(40), rtol=0, atol=1e-4)
    assert kept(MemoryAttention(l, psc, seed=0)).mean() < 0.8
    assert torch.equal(MemoryAttention(l, psc, wm_init="principal", seed=9).wm, principal.wm)
    learnable = MemoryAttention(l, psc, wm_init="principal", learnable_wm=True)
    assert [name for name, _ in learnable.named_parameters()] == ["wm"]
    assert torch.equal(learnable.wm.detach(), principal.wm)


def test_unknown_wm_init_and_a_principal_wm_wider_than_the_features_are_refused():
    with pytest.raises(ValueError, match="wm_init must be one of"):
        MemoryAttention(8, bank(), wm_init="pca")
    with pytest.raises(ValueError, match="query_dim ≤ d"):
        MemoryAttention(30, bank(40, 24), wm_init="principal")


def test_gradients_reach_queries_and_learnable_wm():
    module = MemoryAttention(8, bank(), learnable_wm=True)
    queries = torch.randn(30, 8, generator=torch.Generator().manual_seed(8)).requires_grad_()
    module(queries).square().sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert module.wm.grad is not None and module.wm.grad.abs().sum() > 0
    assert module.psc.grad is None  # the bank is fixed


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor produced by a torch op."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_decode_map_is_chunked_and_equals_unchunked():
    h, w, l, t, d, chunk = 48, 64, 8, 300, 16, 500
    module = MemoryAttention(l, bank(t, d), chunk=chunk)
    query_map = torch.randn(h, w, l, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), _Shapes() as probe:
        decoded = module.decode_map(query_map)
    # Score matrices have at most chunk rows; nothing is larger than the [H·W, d] output or one chunk × t block.
    scores = [s for s in probe.shapes if len(s) == 2 and s[1] == t]
    assert scores and max(s[0] for s in scores) == chunk
    assert max(torch.Size(s).numel() for s in probe.shapes) <= max(h * w * d, chunk * t) < h * w * t
    with torch.no_grad():
        whole = module(query_map.reshape(-1, l)).reshape(h, w, d)
    torch.testing.assert_close(decoded, whole, rtol=1e-6, atol=1e-6)


def test_decode_map_gradients_match_unchunked():
    module = MemoryAttention(4, bank(50, 12), learnable_wm=True, chunk=37)
    query_map = torch.randn(10, 11, 4, generator=torch.Generator().manual_seed(6)).requires_grad_()
    module.decode_map(query_map).sum().backward()
    grad_q, grad_wm = query_map.grad.clone(), module.wm.grad.clone()
    query_map.grad, module.wm.grad = None, None
    module(query_map.reshape(-1, 4)).sum().backward()
    # Chunks sum the Wm gradient in another order: float32 rounding only.
    torch.testing.assert_close(grad_q, query_map.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_wm, module.wm.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_round_trip(tmp_path, learnable):
    module = MemoryAttention(8, bank(), learnable_wm=learnable, seed=7)
    path = tmp_path / "memory.pt"
    torch.save(module.state_dict(), path)
    state = torch.load(path)
    assert set(state) == {"wm", "psc"}
    restored = MemoryAttention.from_state_dict(state, learnable_wm=learnable)
    other_seed = MemoryAttention(8, torch.zeros(40, 24), learnable_wm=learnable, seed=99)
    other_seed.load_state_dict(state)
    queries = torch.randn(20, 8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(restored(queries), module(queries))
    assert torch.equal(other_seed(queries), module(queries))


def masked_reference(module: MemoryAttention, queries: torch.Tensor, k: int) -> torch.Tensor:
    """softmax over each query's k best cosine scores (the others -inf), times the bank: the sparse formula."""
    projected = queries @ module.wm
    scores = F.normalize(projected, dim=1) @ F.normalize(module.psc, dim=1).T / module.temperature
    kth = scores.topk(k, dim=1).values[:, -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=1) @ module.psc


@pytest.mark.parametrize("k", [40, 41, 100])
def test_top_k_of_the_whole_bank_is_the_dense_softmax(k):
    psc, queries = bank(40, 24), torch.randn(60, 8, generator=torch.Generator().manual_seed(10))
    dense, sparse = MemoryAttention(8, psc, seed=2), MemoryAttention(8, psc, seed=2, top_k=k)
    torch.testing.assert_close(sparse(queries), dense(queries), rtol=0, atol=0)


def test_top_k_mixes_only_the_k_best_rows():
    module = MemoryAttention(8, bank(40, 24), temperature=0.2, seed=2, top_k=5)
    queries = torch.randn(60, 8, generator=torch.Generator().manual_seed(11))
    out = module(queries)
    torch.testing.assert_close(out, masked_reference(module, queries, 5), rtol=1e-5, atol=1e-5)
    # at τ = 0.2 the dense softmax gives the other 35 rows visible weight: the sparse output differs from it
    assert (out - MemoryAttention(8, bank(40, 24), temperature=0.2, seed=2)(queries)).abs().max() > 1e-2


def test_top_1_decodes_to_the_best_scoring_row():
    psc = bank(40, 24)
    module = MemoryAttention(8, psc, temperature=1.0, seed=3, top_k=1)   # a soft τ: the dense answer would blend
    queries = torch.randn(60, 8, generator=torch.Generator().manual_seed(12))
    best = (F.normalize(queries @ module.wm, dim=1) @ F.normalize(psc, dim=1).T).argmax(dim=1)
    torch.testing.assert_close(module(queries), psc[best], rtol=0, atol=0)
    with torch.no_grad():   # decode_map takes the same path chunk by chunk
        torch.testing.assert_close(module.decode_map(queries.reshape(6, 10, 8)), psc[best].reshape(6, 10, 24))


def test_top_k_gradients_reach_queries_and_learnable_wm():
    module = MemoryAttention(8, bank(), temperature=0.3, learnable_wm=True, top_k=4)
    queries = torch.randn(30, 8, generator=torch.Generator().manual_seed(13)).requires_grad_()
    module(queries).square().sum().backward()
    grad_q, grad_wm = queries.grad.clone(), module.wm.grad.clone()
    assert grad_q.abs().sum() > 0 and grad_wm.abs().sum() > 0 and module.psc.grad is None
    queries.grad, module.wm.grad = None, None
    masked_reference(module, queries, 4).square().sum().backward()
    torch.testing.assert_close(grad_q, queries.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_wm, module.wm.grad, rtol=1e-4, atol=1e-5)


def test_negative_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        MemoryAttention(8, bank(), top_k=-1)


def test_top_k_and_a_shared_latent_survive_the_checkpoint(tmp_path):
    """A memory file keeps each attention's top_k and the Gaussians' query layout (the baseline's shared latent)."""
    rng = np.random.default_rng(0)
    views = TrainingViews(np.eye(4)[None], np.array([[[50.0, 0, 16], [0, 50, 12], [0, 0, 1]]]), 32, 24)
    points, colours = rng.normal(size=(20, 3)), rng.uniform(size=(20, 3))
    identities = {"a": {"name": "a"}, "b": {"name": "b"}}
    split = GaussianModel.from_points(points, colours, {"a": 8, "b": 4}, GaussianConfig())
    m3 = Memory(split, {"a": MemoryAttention(8, bank(), top_k=3), "b": MemoryAttention(4, bank(9, 5))}, identities,
                views=views)
    loaded, _ = load_memory(save_memory(tmp_path / "m3.pt", m3))
    assert (loaded.attentions["a"].top_k, loaded.attentions["b"].top_k) == (3, 0)
    assert loaded.gaussians.query_layout == "split" and loaded.gaussians.query_slice("b") == slice(8, 12)
    queries = torch.randn(7, 8, generator=torch.Generator().manual_seed(14))
    assert torch.equal(loaded.attentions["a"](queries), m3.attentions["a"](queries))

    shared = GaussianModel.from_points(points, colours, {"a": 8, "b": 4}, GaussianConfig(), query_layout="shared")
    assert shared.params["queries"].shape == (20, 12) and shared.query_slice("b") == slice(0, 12)
    distill = Memory(shared, {"a": FeatureDecoder(12, 24), "b": FeatureDecoder(12, 5)}, identities, views=views)
    loaded, _ = load_memory(save_memory(tmp_path / "distill.pt", distill))
    assert loaded.gaussians.query_layout == "shared" and loaded.gaussians.query_width("a") == 12
    # a decoder reading only its split slice does not fit a shared latent: refused before writing
    with pytest.raises(CheckpointError, match="takes 8 query dims, its slice has 12"):
        save_memory(tmp_path / "bad.pt", Memory(shared, {"a": FeatureDecoder(8, 24), "b": FeatureDecoder(12, 5)},
                                                 identities, views=views))


def test_training_settings_check_top_k_and_the_query_layout():
    assert TrainConfig.from_dict({"top_k": 8, "query_layout": "shared"}).top_k == 8
    with pytest.raises(ConfigError, match="top_k must be at least 0"):
        TrainConfig.from_dict({"top_k": -1})
    with pytest.raises(ConfigError, match="query_layout must be one of"):
        TrainConfig.from_dict({"query_layout": "diagonal"})


def test_distillation_baseline_shares_one_latent_of_m3s_total_query_size(tmp_path):
    """The paper's F-3DGS protocol: two models → one 2·l latent per Gaussian, each MLP reading all of it."""
    scene = Scene.load(demo_scene("tiny"))
    rng = np.random.default_rng(0)
    features = {name: ViewFeatures({"name": name}, [rng.standard_normal((15, 20, d)).astype(np.float16)
                                                    for _ in range(len(scene))]) for name, d in (("a", 6), ("b", 4))}
    config = TrainConfig(iterations=3, query_dim=5, init_max_points=500, feature_samples=50)
    memory = train_distilled(scene, features, config, tmp_path / "distill.pt")
    loaded, _ = load_memory(tmp_path / "distill.pt")
    for m in (memory, loaded):
        assert m.gaussians.query_layout == "shared" and m.gaussians.params["queries"].shape[1] == 10
        assert [m.attentions[name].dims for name in ("a", "b")] == [(10, 64, 6), (10, 64, 4)]
        assert m.config["query_layout"] == "shared"
