"""Gaussian memory attention: formula, chunked decoding, gradients, state dict."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from m3_memory.core.memory.attention import MemoryAttention


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
