"""Training an M3 memory from a posed scene and per-view foundation-model features (M3 §3, our notes §6-7).

Per iteration: render one training view (colour + principal queries), RGB loss (L1 + D-SSIM), then for each model decode
the rendered queries of `feature_samples` random pixels through its memory attention (or another decoder, as the
distillation baseline's MLP) and compare with the raw features there (cosine + L2). Adam with 3DGS learning rates;
densification is gsplat's `DefaultStrategy`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from m3_memory.core.checkpoint import Memory, load_memory, save_memory
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianConfig, GaussianModel
from m3_memory.core.losses import feature_loss, psnr, rgb_loss
from m3_memory.core.memory import DEFAULT_PSC_CONFIGS, MemoryAttention, PSCConfig, principal_scene_components
from m3_memory.core.scene import Scene, init_points_from_depth


class TrainingCancelled(M3Error):
    """Raised inside `train` when its `should_cancel` callback says so; nothing is written."""


@dataclass
class LearningRates:
    means: float = 1.6e-4          # × scene scale, decayed exponentially to `means_final` × that
    means_final: float = 0.01
    scales: float = 5e-3
    quats: float = 1e-3
    opacities: float = 5e-2
    sh0: float = 2.5e-3
    shN: float = 2.5e-3 / 20
    queries: float = 5e-3
    wm: float = 1e-3               # learnable decoder weights: Wm with learnable_wm, the distillation baseline's MLP


@dataclass
class DensifyConfig:
    """gsplat DefaultStrategy settings (3DGS defaults for 30k iterations; scale them with the schedule)."""
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3000
    grow_grad2d: float = 2e-4
    prune_opa: float = 0.005


@dataclass
class TrainConfig:
    iterations: int = 7000
    seed: int = 0
    device: str = "auto"                    # auto = cuda when available
    query_dim: int = 16                     # principal-query dims per model
    temperature: float = 0.05
    learnable_wm: bool = False
    ssim_weight: float = 0.2
    feature_weight: float = 0.5
    feature_samples: int = 2000             # pixels per view per model in the feature loss
    psc_pixel_stride: int = 4               # every k-th pixel (both axes) of every view feeds Algorithm 1
    init_stride: int = 4                    # back-projected depth pixels for the initial Gaussians
    init_max_points: int = 50_000
    holdout_every: int = 0                  # > 0: views 0, k, 2k, ... are held out for evaluation (LLFF convention)
    log_every: int = 50
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    psc: dict[str, PSCConfig] = field(default_factory=dict)   # per model; DEFAULT_PSC_CONFIGS otherwise

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        nested = {"gaussians": GaussianConfig, "lr": LearningRates, "densify": DensifyConfig}
        for key, kind in nested.items():
            if key in data:
                data[key] = kind(**data[key])
        if "psc" in data:
            data["psc"] = {name: PSCConfig(**value) for name, value in data["psc"].items()}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass
class ViewFeatures:
    """One model's dense features of every training view: `maps[i]: [h, w, d]` (any h, w; float16 memmaps are fine)."""
    identity: dict
    maps: Sequence[np.ndarray]


# (features per model, training view indices) → per model a decoder of rendered queries [P, l] into features [P, d]
DecoderBuilder = Callable[[dict[str, ViewFeatures], np.ndarray], dict[str, torch.nn.Module]]


@dataclass
class Progress:
    iteration: int
    total: int
    loss: float
    rgb_loss: float
    feature_loss: float
    num_gaussians: int
    elapsed_s: float
    eta_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_views(n_views: int, holdout_every: int) -> np.ndarray:
    """Indices of the views trained on: all, or all but 0, k, 2k, ... when `holdout_every` = k > 0."""
    views = np.arange(n_views)
    if holdout_every > 0:
        views = views[views % holdout_every != 0]
    if len(views) == 0:
        raise M3Error(f"holdout_every={holdout_every} leaves no training view of {n_views}")
    return views


def scene_scale(c2w: np.ndarray) -> float:
    """3DGS's scene extent: 1.1 × the largest camera distance from the cameras' centroid."""
    centers = c2w[:, :3, 3]
    return float(1.1 * np.linalg.norm(centers - centers.mean(axis=0), axis=1).max())


def build_attention(name: str, features: ViewFeatures, config: TrainConfig, device, views=None) -> MemoryAttention:
    """Algorithm 1 over this model's (strided) pixel features of all views (or of `views`) → its memory attention."""
    stride = config.psc_pixel_stride
    maps = features.maps if views is None else [features.maps[i] for i in views]
    rows = np.concatenate([np.asarray(m[::stride, ::stride]).reshape(-1, m.shape[-1]) for m in maps])
    rows = rows[np.abs(rows).sum(axis=1) > 0]
    psc_config = config.psc.get(name) or DEFAULT_PSC_CONFIGS.get(name) or PSCConfig(threshold=0.85, chunk=2000)
    result = principal_scene_components(torch.from_numpy(rows.astype(np.float32)), psc_config, device=device)
    attention = MemoryAttention(config.query_dim, result.components, temperature=config.temperature,
                                learnable_wm=config.learnable_wm, seed=config.seed).to(device)
    return attention


def _optimizers(model: GaussianModel, decoders: dict[str, torch.nn.Module], config: TrainConfig, scale: float):
    lr = config.lr
    rates = {"means": lr.means * scale, "scales": lr.scales, "quats": lr.quats, "opacities": lr.opacities,
             "sh0": lr.sh0, "shN": lr.shN, "queries": lr.queries}
    optimizers = {name: torch.optim.Adam([{"params": [param], "lr": rates[name], "name": name}], eps=1e-15)
                  for name, param in model.params.items()}
    learned = [p for d in decoders.values() for p in d.parameters() if p.requires_grad]
    extra = [torch.optim.Adam(learned, lr=lr.wm)] if learned else []
    return optimizers, extra


def sample_features(features: ViewFeatures, view: int, us: np.ndarray, vs: np.ndarray, width: int, height: int):
    """Raw features `[P, d]` at pixels (us, vs) of `view`, read from its (possibly lower-resolution) map."""
    fmap = features.maps[view]
    fy = np.minimum((vs * fmap.shape[0]) // height, fmap.shape[0] - 1)
    fx = np.minimum((us * fmap.shape[1]) // width, fmap.shape[1] - 1)
    return torch.from_numpy(np.asarray(fmap[fy, fx], dtype=np.float32))


def train(scene: Scene, features: dict[str, ViewFeatures], config: TrainConfig, output: str | Path,
          callback: Callable[[Progress], None] | None = None, should_cancel: Callable[[], bool] | None = None,
          resume: str | Path | None = None, decoders: DecoderBuilder | None = None,
          record: dict | None = None) -> Memory:
    """Train a memory on `scene` and write it to `output` (atomically). `callback` gets a Progress every `log_every`
    iterations; `should_cancel()` is polled every iteration; `resume` continues a checkpoint written by this function.
    `decoders(features, training view indices)` builds each model's decoder (`[P, l] → [P, d]`; moved to the training
    device here, its trainable parameters learned at `config.lr.wm`); default: M3's memory attention, `build_attention`.
    `record` is stored in the checkpoint's config beside the settings (what the memory is, e.g. a baseline's method).
    """
    from gsplat.strategy import DefaultStrategy

    if len(scene) == 0:
        raise M3Error("the scene has no frames: record or load one with posed images")
    for name, feats in features.items():
        if len(feats.maps) != len(scene):
            raise M3Error(f"model {name!r} has features for {len(feats.maps)} views, the scene has {len(scene)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    images = torch.from_numpy(scene.images()).to(device).float() / 255.0          # [n, H, W, 3]
    n_views, height, width = images.shape[:3]
    Ks = torch.from_numpy(scene.Ks).float().to(device)                             # [n, 3, 3]
    c2w = torch.from_numpy(scene.c2w).float().to(device)                           # [n, 4, 4]
    scale = scene_scale(scene.c2w)
    train_views = training_views(n_views, config.holdout_every)

    if resume is not None:
        memory, state = load_memory(resume, device)
        if state is None:
            raise M3Error(f"{resume} holds no training state to resume from (it was saved for serving only)")
        model, attentions, start = memory.gaussians, memory.attentions, memory.iteration
    else:
        xyz, rgb = init_points_from_depth(scene, stride=config.init_stride, max_points=config.init_max_points,
                                          seed=config.seed, views=train_views)
        model = GaussianModel.from_points(xyz, rgb, {name: config.query_dim for name in features}, config.gaussians,
                                          seed=config.seed).to(device)
        if decoders is None:
            attentions = {name: build_attention(name, feats, config, device, train_views)
                          for name, feats in features.items()}
        else:
            attentions = {name: decoder.to(device) for name, decoder in decoders(features, train_views).items()}
        state, start = None, 0
    optimizers, extra_optimizers = _optimizers(model, attentions, config, scale)
    d = config.densify
    strategy = DefaultStrategy(prune_opa=d.prune_opa, grow_grad2d=d.grow_grad2d, refine_start_iter=d.refine_start_iter,
                               refine_stop_iter=d.refine_stop_iter, reset_every=d.reset_every,
                               refine_every=d.refine_every)
    strategy.check_sanity(model.params, optimizers)
    strategy_state = strategy.initialize_state(scene_scale=scale)
    if state is not None:
        for name, opt_state in state["optimizers"].items():
            optimizers[name].load_state_dict(opt_state)
        for opt, opt_state in zip(extra_optimizers, state["extra_optimizers"]):
            opt.load_state_dict(opt_state)
        strategy_state.update(state["strategy"])
        rng.bit_generator.state = state["rng"]
    decay = config.lr.means_final ** (1.0 / max(config.iterations, 1))
    order: list[int] = list(state["order"]) if state is not None else []
    begin, last = time.monotonic(), {}
    for step in range(start, config.iterations):
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"training cancelled at iteration {step}")
        if not order:
            order = rng.permutation(train_views).tolist()
        view = order.pop()
        out = model.render(c2w[view:view + 1], Ks[view:view + 1], width, height)
        loss_rgb = rgb_loss(out["rgb"], images[view:view + 1], config.ssim_weight)
        loss_feat = torch.zeros((), device=device)
        if features:
            us = rng.integers(0, width, config.feature_samples)
            vs = rng.integers(0, height, config.feature_samples)
            rendered = out["queries"][0, torch.from_numpy(vs).to(device), torch.from_numpy(us).to(device)]
            for name, feats in features.items():
                decoded = attentions[name](rendered[:, model.query_slice(name)])
                raw = sample_features(feats, view, us, vs, width, height).to(device)
                loss_feat = loss_feat + feature_loss(decoded, raw)
        loss = loss_rgb + config.feature_weight * loss_feat
        strategy.step_pre_backward(model.params, optimizers, strategy_state, step, out["meta"])
        loss.backward()
        for opt in [*optimizers.values(), *extra_optimizers]:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for group in optimizers["means"].param_groups:
            group["lr"] *= decay
        strategy.step_post_backward(model.params, optimizers, strategy_state, step, out["meta"], packed=False)
        last = {"loss": loss.item(), "rgb": loss_rgb.item(), "feat": loss_feat.item()}
        done = step + 1
        if callback is not None and (done % config.log_every == 0 or done == config.iterations):
            elapsed = time.monotonic() - begin
            rate = elapsed / (done - start)
            callback(Progress(done, config.iterations, last["loss"], last["rgb"], last["feat"], len(model),
                              elapsed, rate * (config.iterations - done)))
    views = {"c2w": scene.c2w[train_views], "K": scene.Ks[train_views], "width": width, "height": height}
    memory = Memory(model, attentions, {name: f.identity for name, f in features.items()}, scene.world_frame,
                    {**asdict(config), **(record or {})}, config.iterations, views)
    memory.config["final"] = {**last, "train_s": time.monotonic() - begin,
                              "psnr": training_psnr(model, c2w[train_views], Ks[train_views], images[train_views])}
    training_state = {
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "extra_optimizers": [opt.state_dict() for opt in extra_optimizers],
        "strategy": {k: v for k, v in strategy_state.items() if k != "scene_scale"},
        "rng": rng.bit_generator.state,
        "order": order,
    }
    save_memory(output, memory, training_state)
    return memory


def training_psnr(model: GaussianModel, c2w, Ks, images, max_views: int = 8) -> float:
    """Mean PSNR over up to `max_views` evenly spaced training views `images: [n, H, W, 3]`."""
    views = np.unique(np.linspace(0, len(images) - 1, min(max_views, len(images))).round().astype(int))
    height, width = images.shape[1:3]
    with torch.no_grad():
        return float(np.mean([psnr(model.render(c2w[v:v + 1], Ks[v:v + 1], width, height)["rgb"], images[v:v + 1])
                              for v in views]))
