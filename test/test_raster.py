"""Tests of the differentiable Gaussian rasterizer (CPU backend; gsplat parity on CUDA machines)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from m3_memory.core.raster import rasterization
from m3_memory.core.raster.extension import BUILD_COMMAND, EXT_NAME, STAMP, load_extension
from m3_memory.core.raster.projection import project

F64 = torch.float64


def camera(width: int, height: int, f: float, cx: float, cy: float, dtype=F64):
    """Identity pose (world = camera frame) and intrinsics: viewmats [1, 4, 4], Ks [1, 3, 3]."""
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=dtype)
    return torch.eye(4, dtype=dtype)[None], K[None]


def orbit_cameras(n: int, radius: float, f: float, width: int, height: int, dtype=F64):
    """n cameras on a circle around the origin looking at it: viewmats [n, 4, 4], Ks [n, 3, 3]."""
    mats = []
    for i in range(n):
        a = 2 * math.pi * i / n + 0.3
        eye = torch.tensor([radius * math.sin(a), 0.3, -radius * math.cos(a)], dtype=dtype)
        fwd = -eye / eye.norm()
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=dtype), fwd)
        right = right / right.norm()
        down = torch.linalg.cross(fwd, right)
        R = torch.stack([right, down, fwd])  # rows: camera axes in world
        m = torch.eye(4, dtype=dtype)
        m[:3, :3], m[:3, 3] = R, -R @ eye
        mats.append(m)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)
    return torch.stack(mats), K.expand(n, 3, 3).clone()


def random_scene(n: int, channels: int, seed: int = 0, dtype=F64):
    """means [n, 3] around the origin, unnormalised quats [n, 4], scales [n, 3], opacities [n], colors [n, C]."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.6
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = 0.05 + 0.15 * torch.rand(n, 3, generator=g, dtype=dtype)
    opacities = 0.1 + 0.6 * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, channels, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors


def test_single_isotropic_gaussian_matches_analytic_footprint():
    W, H, f, z, s, o = 64, 48, 80.0, 4.0, 0.15, 0.6
    cx, cy = 30.3, 25.7  # projected centre between pixel centres
    viewmats, Ks = camera(W, H, f, cx, cy)
    means = torch.tensor([[0.0, 0.0, z]], dtype=F64)
    quats = torch.tensor([[0.3, -0.2, 0.5, 0.7]], dtype=F64)  # any rotation: the Gaussian is isotropic
    color = torch.tensor([[0.2, 0.5, 0.9]], dtype=F64)
    rgb, alpha, depth, meta = rasterization(
        means, quats, torch.full((1, 3), s, dtype=F64), torch.tensor([o], dtype=F64), color, viewmats, Ks, W, H
    )
    var = (f * s / z) ** 2 + 0.3  # EWA pixel variance + gsplat's eps2d blur
    jj, ii = torch.meshgrid(torch.arange(W, dtype=F64) + 0.5, torch.arange(H, dtype=F64) + 0.5, indexing="xy")
    expected = o * torch.exp(-0.5 * ((jj - cx) ** 2 + (ii - cy) ** 2) / var)
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    torch.testing.assert_close(alpha[0, ..., 0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rgb[0], expected[..., None] * color[0], rtol=1e-10, atol=1e-12)
    peak = int(alpha[0, ..., 0].argmax())
    assert (peak % W, peak // W) == (int(cx), int(cy))
    assert torch.allclose(depth[0][alpha[0] > 0], torch.tensor(z, dtype=F64))
    torch.testing.assert_close(meta["means2d"][0, 0], torch.tensor([cx, cy], dtype=F64))
    extend = min(3.33, math.sqrt(2 * math.log(o * 255)))
    assert meta["radii"][0, 0].tolist() == [math.ceil(extend * math.sqrt(var))] * 2


@pytest.mark.parametrize("far_first", [False, True])
def test_two_gaussians_composite_front_to_back(far_first):
    W = H = 32
    viewmats, Ks = camera(W, H, 50.0, 16.5, 16.5)  # the optical axis hits pixel (16, 16) at its centre
    z, o = [2.0, 3.0], [0.6, 0.7]
    c = torch.tensor([[1.0, 0.2, 0.1, 5.0], [0.1, 0.3, 0.9, -2.0]], dtype=F64)
    order = [1, 0] if far_first else [0, 1]
    means = torch.tensor([[0.0, 0.0, z[i]] for i in order], dtype=F64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=F64)
    scales = torch.full((2, 3), 0.1, dtype=F64)
    bg = torch.tensor([[0.5, 0.5, 0.5, 1.0]], dtype=F64)
    rgb, alpha, depth, _ = rasterization(
        means, quats, scales, torch.tensor([o[i] for i in order], dtype=F64), c[order], viewmats, Ks, W, H,
        backgrounds=bg,
    )
    t1 = 1 - o[0]  # transmittance after the near Gaussian
    acc = 1 - t1 * (1 - o[1])
    assert alpha[0, 16, 16, 0].item() == pytest.approx(acc, abs=1e-12)
    torch.testing.assert_close(rgb[0, 16, 16], c[0] * o[0] + c[1] * o[1] * t1 + (1 - acc) * bg[0])
    assert depth[0, 16, 16, 0].item() == pytest.approx((z[0] * o[0] + z[1] * o[1] * t1) / acc, abs=1e-12)


def test_gradients_match_finite_differences():
    W, H, C = 40, 32, 4
    means, quats, scales, opacities, colors = random_scene(6, C, seed=1)
    viewmats, Ks = orbit_cameras(2, 3.0, 30.0, W, H)
    g = torch.Generator().manual_seed(2)
    w_rgb = torch.randn(2, H, W, C, generator=g, dtype=F64)
    w_alpha, w_depth = torch.randn(2, H, W, 1, generator=g, dtype=F64), torch.randn(2, H, W, 1, generator=g, dtype=F64)
    bg = torch.rand(2, C, generator=g, dtype=F64)

    def loss(means, quats, scales, opacities, colors):
        rgb, alpha, depth, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backgrounds=bg)
        return (rgb * w_rgb).sum() + (alpha * w_alpha).sum() + (depth * alpha * w_depth).sum()

    params = [p.clone().requires_grad_(True) for p in (means, quats, scales, opacities, colors)]
    assert loss(*params).item() != 0
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def dense_composite(means2d, conics, opacities, features, width, height):
    """Reference compositing of one camera without tiles: every pixel against every Gaussian, sorted by depth
    (features[:, -1]). means2d [N, 2], conics [N, 3], opacities [N], features [N, D] -> [H, W, D], alpha [H, W]."""
    order = features[:, -1].argsort()
    means2d, conics, opacities, features = means2d[order], conics[order], opacities[order], features[order]
    jj, ii = torch.meshgrid(torch.arange(width, dtype=F64) + 0.5, torch.arange(height, dtype=F64) + 0.5, indexing="xy")
    dx = means2d[:, 0] - jj.reshape(-1, 1)  # [P, N]
    dy = means2d[:, 1] - ii.reshape(-1, 1)
    sigma = 0.5 * (conics[:, 0] * dx**2 + conics[:, 2] * dy**2) + conics[:, 1] * dx * dy
    alpha = (opacities * torch.exp(-sigma)).clamp(max=0.999)
    alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
    after = torch.cumprod(1 - alpha, dim=1)
    before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], 1)
    weights = alpha * before * (after > 1e-4)  # a pixel stops before the Gaussian taking T to 1e-4
    return (weights @ features).reshape(height, width, -1), weights.sum(1).reshape(height, width)


# C + 1 rendered channels (colours + depth): 6 and 20 padded to whole vectors in the kernel, 8 exactly one
CHANNELS = [5, 7, 19]


@pytest.mark.parametrize("C", CHANNELS)
def test_tiled_compositing_matches_dense_reference(C):
    W, H = 70, 45  # not multiples of the tile size
    means, quats, scales, _, colors = random_scene(400, C, seed=7)
    opacities = 0.3 + 0.65 * torch.rand(400, generator=torch.Generator().manual_seed(8), dtype=F64)
    viewmats, Ks = orbit_cameras(2, 2.5, 45.0, W, H)
    rgb, alpha, depth, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    # early termination (transmittance reaching 1e-4) happens on many pixels, and sparse pixels occur too
    assert (alpha > 1 - 2e-4).float().mean() > 0.1 and (alpha < 0.5).any()
    for b in range(2):
        seen = (meta["radii"][b] > 0).all(-1)
        feats = torch.cat([colors, meta["depths"][b, :, None]], -1)[seen].detach()
        ref, ref_alpha = dense_composite(meta["means2d"][b][seen].detach(), meta["conics"][b][seen].detach(),
                                         opacities[seen], feats, W, H)  # fmt: skip
        torch.testing.assert_close(rgb[b], ref[..., :C], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(alpha[b, ..., 0], ref_alpha, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(depth[b] * alpha[b], ref[..., C:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("C", CHANNELS)
def test_hand_written_backward_matches_autograd_of_dense_reference(C):
    """Dense scene (early termination on many pixels): our backward against autograd through the reference."""
    W, H = 40, 30
    means, quats, scales, _, colors = random_scene(300, C, seed=9)
    opacities = (0.3 + 0.65 * torch.rand(300, generator=torch.Generator().manual_seed(10), dtype=F64))
    viewmats, Ks = orbit_cameras(1, 2.5, 28.0, W, H)
    ours, reference, alpha = _backward_against_dense_reference(means, quats, scales, opacities, colors, viewmats, Ks,
                                                               W, H, seed=11)
    assert (alpha > 1 - 2e-4).float().mean() > 0.1
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_culled_gaussians_never_crash_or_leak_nan():
    W, H = 48, 40
    means, quats, scales, opacities, colors = random_scene(5, 3, seed=3)
    viewmats, Ks = orbit_cameras(1, 3.0, 40.0, W, H)
    nan = float("nan")
    R, t = viewmats[0, :3, :3], viewmats[0, :3, 3]
    in_camera = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -2.0], [0.0, 0.0, 3.0], [nan, 0.0, 3.0], [50.0, 0.0, 5.0]],
                             dtype=F64)  # fmt: skip
    bad_means = (in_camera - t) @ R  # world = R^T (p_c - t): [1] behind the camera, [4] far off-screen
    bad_scales = torch.full((5, 3), 0.1, dtype=F64)
    bad_scales[0] = 0.0  # degenerate: zero scale
    bad_quats = torch.tensor([[1.0, 0, 0, 0]] * 5, dtype=F64)
    bad_quats[2] = nan  # NaN rotation
    bad_opacities = torch.full((5,), 0.5, dtype=F64)
    bad_colors = torch.full((5, 3), nan, dtype=F64)  # only ever read for composited Gaussians

    args = [torch.cat(pair).requires_grad_(True) for pair in zip((means, quats, scales, opacities, colors),
                                                                    (bad_means, bad_quats, bad_scales, bad_opacities,
                                                                     bad_colors))]  # fmt: skip
    rgb, alpha, depth, meta = rasterization(*args, viewmats, Ks, W, H)
    ref = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    for got, want in zip((rgb, alpha, depth), ref[:3]):
        torch.testing.assert_close(got, want)
    assert (meta["radii"][:, 5:] == 0).all() and (meta["radii"][:, :5] > 0).any()
    (rgb.sum() + alpha.sum() + depth.sum()).backward()
    for p in args:
        assert torch.isfinite(p.grad).all()
        assert (p.grad[5:] == 0).all()
    assert (args[0].grad[:5] != 0).any()


def test_multi_camera_and_many_channels_are_consistent():
    W, H, C = 50, 36, 100
    means, quats, scales, opacities, colors = random_scene(40, C, seed=4, dtype=torch.float32)
    viewmats, Ks = orbit_cameras(3, 3.0, 40.0, W, H, dtype=torch.float32)
    rgb, alpha, depth, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    assert rgb.shape == (3, H, W, C) and alpha.shape == depth.shape == (3, H, W, 1)
    assert meta["means2d"].shape == (3, 40, 2) and meta["radii"].shape == (3, 40, 2) and meta["n_cameras"] == 3
    for b in range(3):
        one = rasterization(means, quats, scales, opacities, colors[:, :3], viewmats[b : b + 1], Ks[b : b + 1], W, H)
        torch.testing.assert_close(one[0][0], rgb[b, ..., :3])
        torch.testing.assert_close(one[1][0], alpha[b])
    assert alpha.amax() > 0.5 and (alpha <= 1).all()


def test_missing_or_stale_build_names_the_build_command(tmp_path):
    command = BUILD_COMMAND.replace(".", r"\.")
    with pytest.raises(RuntimeError, match=f"not built.*{command}"):
        load_extension(tmp_path)
    (tmp_path / f"{EXT_NAME}.so").write_bytes(b"")
    (tmp_path / STAMP).write_text("digest of other sources")
    with pytest.raises(RuntimeError, match=f"stale.*{command}"):
        load_extension(tmp_path)


def test_projection_culls_by_near_and_far_plane():
    viewmats, Ks = camera(32, 32, 30.0, 16.0, 16.0)
    means = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 2.0], [0.0, 0.0, 9.0]], dtype=F64)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 3, dtype=F64)
    proj = project(means, quats, torch.full((3, 3), 0.05, dtype=F64), torch.full((3,), 0.5, dtype=F64), viewmats, Ks,
                   32, 32, near_plane=1.0, far_plane=5.0)  # fmt: skip
    assert (proj.radii[0] > 0).all(-1).tolist() == [False, True, False]


def _gsplat():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "m3_torch_extensions"))
    return pytest.importorskip("gsplat", reason="gsplat not installed")


def run_default_strategy(absgrad: bool):
    """Two training steps with gsplat's DefaultStrategy on our CPU meta; returns (state, visibility counts [N],
    number of Gaussians before and after the refine step)."""
    strategy_mod = _gsplat().strategy
    W, H = 48, 40
    means, quats, scales, opacities, colors = random_scene(30, 3, seed=5, dtype=torch.float32)
    viewmats, Ks = orbit_cameras(2, 3.0, 40.0, W, H, dtype=torch.float32)
    params = torch.nn.ParameterDict({
        "means": means, "quats": quats, "scales": scales.log(), "opacities": torch.logit(opacities), "colors": colors,
    })  # fmt: skip
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = strategy_mod.DefaultStrategy(
        refine_start_iter=0, refine_every=1, grow_grad2d=1e-12, prune_opa=1e-4, absgrad=absgrad
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)

    def render_step(step: int):
        rgb, alpha, _, meta = rasterization(
            params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]),
            params["colors"], viewmats, Ks, W, H, absgrad=absgrad,
        )  # fmt: skip
        strategy.step_pre_backward(params, optimizers, state, step, meta)
        (rgb - 0.5).abs().mean().backward()
        strategy.step_post_backward(params, optimizers, state, step, meta, packed=False)
        return meta

    meta = render_step(0)
    snapshot = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}  # the refine step resets state
    n_before = len(params["means"])
    render_step(1)  # refine step: gsplat duplicates/splits every Gaussian with a gradient
    return snapshot, (meta["radii"] > 0).all(-1).sum(0), n_before, len(params["means"])


def test_gsplat_default_strategy_runs_on_cpu_meta():
    state, visible, n_before, n_after = run_default_strategy(absgrad=False)
    torch.testing.assert_close(state["count"], visible.float())
    assert (state["grad2d"][visible > 0] > 0).all() and (state["grad2d"][visible == 0] == 0).all()
    assert n_after > n_before
    # AbsGS statistic: per-pixel absolute gradients summed can only be larger than the gradient's norm
    abs_state, _, _, abs_after = run_default_strategy(absgrad=True)
    assert (abs_state["grad2d"] >= state["grad2d"] * (1 - 1e-5)).all()
    assert (abs_state["grad2d"] > state["grad2d"] * 1.01).any() and abs_after > n_before


def test_projection_matches_gsplat_torch_reference():
    """gsplat's private pure-torch projection (1.5.3) runs on CPU: our EWA projection must agree with it."""
    impl = pytest.importorskip("gsplat.cuda._torch_impl", reason="gsplat not installed")
    _gsplat()
    W, H = 64, 48
    means, quats, scales, opacities, _ = random_scene(200, 1, seed=6)
    viewmats, Ks = orbit_cameras(3, 2.0, 50.0, W, H)
    covars, _ = impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(means, covars, viewmats, Ks, W, H)
    ours = project(means, quats, scales, opacities, viewmats, Ks, W, H)
    seen = (ours.radii > 0).all(-1)
    assert seen.sum() > 100 and (seen <= (radii > 0).all(-1)).all()
    for a, b in ((ours.means2d, means2d), (ours.conics, conics), (ours.depths, depths)):
        torch.testing.assert_close(a[seen], b[seen], rtol=1e-9, atol=1e-9)
    assert (ours.radii <= radii).all()  # ours tightens the 3.33-sigma bound by opacity, as gsplat's CUDA code does


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for gsplat")
def test_parity_with_gsplat_on_random_scenes():
    _gsplat()
    W, H, C = 96, 72, 35
    for seed in range(3):
        scene = random_scene(500, C, seed=seed, dtype=torch.float32)
        viewmats, Ks = orbit_cameras(2, 3.0, 70.0, W, H, dtype=torch.float32)
        bg = torch.rand(2, C)
        cpu = rasterization(*scene, viewmats, Ks, W, H, backgrounds=bg, backend="cpu")
        gpu = rasterization(*[x.cuda() for x in (*scene, viewmats, Ks)], W, H, backgrounds=bg.cuda(), backend="cuda")
        torch.testing.assert_close(cpu[0], gpu[0].cpu(), atol=1e-3, rtol=0)
        torch.testing.assert_close(cpu[1], gpu[1].cpu(), atol=1e-3, rtol=0)
        # expected depth is ill-conditioned where alpha ~ 0: compare the accumulated depth instead
        torch.testing.assert_close(cpu[2] * cpu[1], (gpu[2] * gpu[1]).cpu(), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(cpu[3]["radii"], gpu[3]["radii"].cpu())


def _backward_against_dense_reference(means, quats, scales, opacities, colors, viewmats, Ks, W, H, seed):
    """Our gradients (means2d, conics, opacities, colors, depths) and autograd's through `dense_composite`, one
    camera; returns (ours, reference) lists and the rendered alpha."""
    C = colors.shape[1]
    g = torch.Generator().manual_seed(seed)
    w_rgb, w_alpha, w_depth = (torch.randn(H, W, k, generator=g, dtype=F64) for k in (C, 1, 1))
    for leaf in (means, opacities, colors):
        leaf.requires_grad_(True)
    rgb, alpha, depth, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, W, H)
    for key in ("means2d", "conics", "depths"):
        meta[key].retain_grad()
    ((rgb[0] * w_rgb).sum() + (alpha[0] * w_alpha).sum() + (depth[0] * alpha[0] * w_depth).sum()).backward()
    seen = (meta["radii"][0] > 0).all(-1)
    leaves = [meta["means2d"][0][seen], meta["conics"][0][seen], opacities[seen], colors[seen], meta["depths"][0][seen]]
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    ref, ref_alpha = dense_composite(*leaves[:3], torch.cat([leaves[3], leaves[4][:, None]], -1), W, H)
    ((ref[..., :C] * w_rgb).sum() + (ref_alpha[..., None] * w_alpha).sum() + (ref[..., C:] * w_depth).sum()).backward()
    torch.testing.assert_close(alpha[0, ..., 0], ref_alpha.detach(), rtol=1e-9, atol=1e-9)
    ours = [meta["means2d"].grad[0][seen], meta["conics"].grad[0][seen], opacities.grad[seen], colors.grad[seen],
            meta["depths"].grad[0][seen]]  # fmt: skip
    return ours, [leaf.grad for leaf in leaves], alpha


def test_backward_with_more_than_64_contributors_per_pixel():
    """Faint, wide Gaussians: pixels composite more than one 64-Gaussian screening chunk and tiles hold several
    64-bit words of contributor mask, which the backward reloads."""
    W, H = 36, 28
    means, quats, scales, _, colors = random_scene(700, 4, seed=12)
    scales = scales * 2.5
    opacities = 0.02 + 0.04 * torch.rand(700, generator=torch.Generator().manual_seed(13), dtype=F64)
    viewmats, Ks = orbit_cameras(1, 2.5, 24.0, W, H)
    ours, ref, alpha = _backward_against_dense_reference(means, quats, scales, opacities, colors, viewmats, Ks, W, H,
                                                         seed=14)  # fmt: skip
    # with opacity <= 0.06 an alpha above 0.99 takes at least 75 contributors
    assert (alpha > 0.99).float().mean() > 0.05
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_float32_matches_float64():
    """The kernel's own exp (a polynomial per precision) and the float32 channel loops agree with float64."""
    W, H, C = 48, 40, 20
    scene64 = random_scene(500, C, seed=15)
    viewmats, Ks = orbit_cameras(2, 2.5, 40.0, W, H)
    results = []
    for dtype in (F64, torch.float32):
        params = [x.to(dtype).clone().requires_grad_(True) for x in scene64]
        rgb, alpha, depth, _ = rasterization(*params, viewmats.to(dtype), Ks.to(dtype), W, H)
        (rgb.square().sum() + alpha.sum() + (depth * alpha).sum()).backward()
        results.append([x.detach().double() for x in (rgb, alpha, depth * alpha)] + [p.grad.double() for p in params])
    assert results[0][1].amax() > 0.9
    for want, got in zip(*results):
        # a pixel's last contributor may fall on the other side of a 1/255 or 1e-4 cut-off: compare in bulk
        close = torch.isclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().amax().item())
        assert close.float().mean() > 0.999


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_thread_count_does_not_change_the_result(dtype):
    """Tiles are split over threads and the gradients summed per thread: forward bitwise equal, gradients equal up
    to the order of the final sum."""
    W, H, C = 64, 48, 11
    scene = random_scene(600, C, seed=16, dtype=dtype)
    viewmats, Ks = orbit_cameras(2, 2.5, 45.0, W, H, dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            params = [x.clone().requires_grad_(True) for x in scene]
            rgb, alpha, depth, _ = rasterization(*params, viewmats, Ks, W, H)
            (rgb.square().sum() + alpha.sum() + depth.sum()).backward()
            results.append(([rgb, alpha, depth], [p.grad for p in params]))
    finally:
        torch.set_num_threads(threads)
    (image1, grads1), (image3, grads3) = results
    for a, b in zip(image1, image3):
        assert torch.equal(a, b)
    tol = 1e-12 if dtype == F64 else 1e-5
    for a, b in zip(grads1, grads3):
        assert a.abs().amax() > 0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * a.abs().amax().item())


def test_rendering_without_gradients_keeps_no_masks():
    """Under no_grad the forward skips the contributor masks and renders the same image."""
    W, H = 40, 32
    scene = random_scene(200, 3, seed=17)
    viewmats, Ks = orbit_cameras(1, 2.5, 30.0, W, H)
    with torch.no_grad():
        plain = rasterization(*scene, viewmats, Ks, W, H)
    params = [x.clone().requires_grad_(True) for x in scene]
    tracked = rasterization(*params, viewmats, Ks, W, H)
    for a, b in zip(plain[:3], tracked[:3]):
        assert torch.equal(a, b.detach())
