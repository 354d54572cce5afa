"""Training an M3 memory from a posed scene and per-view foundation-model features (M3 §3, our notes §6-7).

Per iteration: render one training view (colour + principal queries), RGB loss (L1 + D-SSIM), then for each model decode
the rendered queries of `feature_samples` random pixels through its memory attention (or another decoder, as the
distillation baseline's MLP) and compare with the raw features there (cosine + L2). Adam with 3DGS learning rates;
densification is gsplat's `DefaultStrategy`, the opacity reset ours (`DensifyConfig.reset_opacity`).
"""
from __future__ import annotations

import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from m3_memory.core.checkpoint import Memory, load_memory, save_memory
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import QUERY_LAYOUTS, GaussianConfig, GaussianModel, reset_opacities
from m3_memory.core.losses import feature_loss, psnr, rgb_loss
from m3_memory.core.memory import MemoryAttention, PSCConfig, principal_scene_components
from m3_memory.core.scene import INIT_METHODS, Scene, initial_points
from m3_memory.core.views import TrainingViews


class TrainingCancelled(M3Error):
    """Raised inside `train` when its `should_cancel` callback says so; nothing is written."""


class ConfigError(M3Error, ValueError):
    """A training setting of unknown name, wrong type or out of range; the message names it."""


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
    """gsplat DefaultStrategy settings (3DGS defaults for 30k iterations; scale them with the schedule), and our
    opacity reset, which gsplat 1.5.3 never applies (its `step % reset_every == 0 & step > 0` is always false)."""
    refine_start_iter: int = 300
    refine_stop_iter: int = 1200
    refine_every: int = 100
    reset_every: int = 1500        # opacity reset interval; gsplat also prunes world-space giants only after it
    reset_opacity: bool = False    # clamp opacities to 2 × prune_opa every reset_every steps before refine_stop_iter
    grow_grad2d: float = 4e-4      # 3DGS's 2e-4 grew the demo to 341k Gaussians (60k here), ~3x slower on CPU
    prune_opa: float = 0.005


@dataclass
class TrainConfig:
    iterations: int = 2000                  # CPU-sized (about 6 min for the demo on 2 idle cores); the paper trains 30k
    seed: int = 0
    device: str = "auto"                    # auto = cuda when available
    query_dim: int = 16                     # principal-query dims per model
    query_layout: str = "split"             # "split": a query_dim slice per model; "shared": all read Σ query_dim
    temperature: float = 0.05
    learnable_wm: bool = False
    top_k: int = 0                          # memory attention over each query's k best bank rows; 0 = dense softmax
    ssim_weight: float = 0.2
    feature_weight: float = 0.5
    feature_samples: int = 2000             # pixels per view per model in the feature loss
    psc_pixel_stride: int = 2               # every k-th feature-map cell (both axes) of every view feeds Algorithm 1
    init: str = "depth"                     # initial Gaussians: "depth" (back-projected) | "colmap" (points3D)
    init_stride: int = 4                    # back-projected depth pixels for the initial Gaussians
    init_max_points: int = 30_000
    holdout_every: int = 0                  # > 0: views 0, k, 2k, ... are held out for evaluation (LLFF convention)
    log_every: int = 50
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    psc: dict[str, PSCConfig] = field(default_factory=dict)   # per model, overriding its psc_threshold in features.yaml

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Settings from a (YAML) mapping, every key and value checked against the dataclasses' fields and `validate`d:
        ConfigError naming the setting otherwise."""
        config = settings_from_dict(cls, data, "")
        config.validate()
        return config

    def validate(self) -> None:
        """ConfigError for a value no training can run with (an iteration count below 1, ...) or a device this machine
        does not have."""
        for name, minimum in MINIMUMS.items():
            if getattr(self, name) < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.query_layout not in QUERY_LAYOUTS:
            raise ConfigError(f"query_layout must be one of {QUERY_LAYOUTS}, got {self.query_layout!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        resolve_device(self.device)


# Smallest value of each count setting that a training can run with.
MINIMUMS = {"iterations": 1, "query_dim": 1, "top_k": 0, "feature_samples": 1, "psc_pixel_stride": 1, "init_stride": 1,
            "init_max_points": 2, "holdout_every": 0, "log_every": 1}


def settings_from_dict(cls, data, where: str):
    """`cls(**data)` for a settings dataclass, after checking each key and value against its field types (bool, int,
    float, str, nested dataclasses, dict[str, dataclass]); `where`: the dotted name of `data` in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the training settings'} must be a mapping of settings, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown training settings {[prefix + str(k) for k in unknown]}; known"
                          f"{f' in {where}' if where else ''}: {sorted(known)}")
    missing = [name for name, f in known.items()
               if name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where or 'the training settings'} lack required settings {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _setting(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()})


def _setting(kind, value, name: str):
    """`value` as a setting of type `kind`, or ConfigError naming `name`."""
    if is_dataclass(kind):
        return settings_from_dict(kind, value, name)
    if typing.get_origin(kind) is dict:
        _, item_kind = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {str(key): _setting(item_kind, item, f"{name}.{key}") for key, item in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)   # YAML reads 1 and 1e-3 alike as numbers
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


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
    """The torch device of the `device` setting (auto = cuda when available), or ConfigError when this machine has
    none such."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} needs CUDA, which this machine's torch does not have: use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def scan_source(scene: Scene, views: Sequence[int], source: str | None = None) -> dict:
    """Provenance of one scan in a memory (`Memory.sources`): `source` (default: the scene directory), the scene
    view indices trained on, their frame ids and stamps, and when (UTC) they joined the memory."""
    views = [int(v) for v in views]
    return {"source": str(scene.root) if source is None else source, "views": views,
            "frame_ids": [scene.frames[v].frame_id for v in views],
            "timestamps_ns": [int(scene.frames[v].timestamp_ns) for v in views],
            "added_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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


def model_psc_threshold(name: str, features: ViewFeatures) -> float:
    """Algorithm 1's θ for the feature model behind `features`: its entry's `psc_threshold` in config/features.yaml."""
    from m3_memory.core.features.registry import load_configs

    entry = load_configs()[1].get(features.identity.get("name", name))
    if entry is None or entry.psc_threshold is None:
        raise ConfigError(f"no PSC threshold for model {name!r}: give its entry in config/features.yaml a "
                          f"psc_threshold, or set psc.{name}.threshold")
    return entry.psc_threshold


def psc_input(name: str, features: ViewFeatures, config: TrainConfig, views=None) -> tuple[np.ndarray, PSCConfig]:
    """Algorithm 1's input for one model: the non-zero rows `[N, d]` float32 of every `psc_pixel_stride`-th feature
    cell of all views (or of `views`), and its settings (`config.psc[name]`, else θ from features.yaml)."""
    stride = config.psc_pixel_stride
    maps = features.maps if views is None else [features.maps[i] for i in views]
    rows = np.concatenate([np.asarray(m[::stride, ::stride]).reshape(-1, m.shape[-1]) for m in maps])
    rows = rows[np.abs(rows).sum(axis=1) > 0].astype(np.float32)
    return rows, config.psc.get(name) or PSCConfig(threshold=model_psc_threshold(name, features))


def build_attention(name: str, features: ViewFeatures, config: TrainConfig, device, views=None,
                    width: int | None = None, components: torch.Tensor | None = None) -> MemoryAttention:
    """Algorithm 1 over this model's `psc_input` (or the given bank `components: [t, d]`) → its memory attention,
    reading `width` query dims (default `config.query_dim`, the model's slice)."""
    if components is None:
        rows, psc_config = psc_input(name, features, config, views)
        components = principal_scene_components(torch.from_numpy(rows), psc_config, device=device).components
    attention = MemoryAttention(width or config.query_dim, components, temperature=config.temperature,
                                learnable_wm=config.learnable_wm, seed=config.seed, top_k=config.top_k).to(device)
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


@dataclass
class ViewSet:
    """One scan's posed images on the training device with their features, as the training loop samples them:
    `images: [n, H, W, 3]` float in [0, 1], `c2w: [n, 4, 4]`, `Ks: [n, 3, 3]`, `features[model].maps[i]` of view i;
    `masks: [n, H, W]` bool, True where a pixel is still true of the place (None: all are; an update marks an old
    scan's pixels of what has changed since, `online.stale_pixels`)."""
    images: torch.Tensor
    c2w: torch.Tensor
    Ks: torch.Tensor
    features: dict[str, ViewFeatures]
    masks: torch.Tensor | None = None

    @classmethod
    def from_scene(cls, scene: Scene, features: dict[str, ViewFeatures], device) -> "ViewSet":
        return cls(torch.from_numpy(scene.images()).to(device).float() / 255.0,
                   torch.from_numpy(scene.c2w).float().to(device), torch.from_numpy(scene.Ks).float().to(device),
                   features)


class TrainingLoop:
    """The optimisation that batch `train` and `online.update` share: Adam per Gaussian parameter (3DGS rates, means
    × scene `scale`) and one for learnable decoder weights, gsplat's DefaultStrategy on `densify`'s schedule (counted
    in the step numbers `run` is given) and our opacity reset. `state` (a saved `training_state`) restores the
    optimisers' moments and learning rates and the strategy's running statistics; the parameters it refers to must
    be `model`'s as they were saved."""

    def __init__(self, model: GaussianModel, decoders: dict[str, torch.nn.Module], config: TrainConfig, scale: float,
                 densify: DensifyConfig, state: dict | None = None):
        from gsplat.strategy import DefaultStrategy

        self.model, self.decoders, self.config, self.densify = model, decoders, config, densify
        self.optimizers, self.extra_optimizers = _optimizers(model, decoders, config, scale)
        d = densify
        self.strategy = DefaultStrategy(prune_opa=d.prune_opa, grow_grad2d=d.grow_grad2d,
                                        refine_start_iter=d.refine_start_iter, refine_stop_iter=d.refine_stop_iter,
                                        reset_every=d.reset_every, refine_every=d.refine_every)
        self.strategy.check_sanity(model.params, self.optimizers)
        self.strategy_state = self.strategy.initialize_state(scene_scale=scale)
        if state is not None:
            for name, opt_state in state["optimizers"].items():
                self.optimizers[name].load_state_dict(opt_state)
            for opt, opt_state in zip(self.extra_optimizers, state["extra_optimizers"]):
                opt.load_state_dict(opt_state)
            self.strategy_state.update(state["strategy"])

    def run(self, steps: range, sample: Callable[[], tuple[ViewSet, int]], rng: np.random.Generator,
            means_decay: float = 1.0, callback: Callable[[Progress], None] | None = None,
            should_cancel: Callable[[], bool] | None = None) -> dict:
        """One iteration per step of `steps` on the view `sample()` picks (a ViewSet and a view index into it): render,
        RGB + feature loss on the view's trusted pixels (`ViewSet.masks`; the sampler must not pick a view without
        any), Adam, densification; the means' learning rate is multiplied by `means_decay` each step.
        `callback` gets a Progress every `log_every` steps and at the last (iteration counted to `steps.stop`).
        Returns the last step's losses `{"loss", "rgb", "feat"}`."""
        config, d, device = self.config, self.densify, self.model.params["means"].device
        model, attentions, optimizers = self.model, self.decoders, self.optimizers
        begin, last = time.monotonic(), {}
        for step in steps:
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled(f"training cancelled at iteration {step}")
            views, view = sample()
            height, width = views.images.shape[1:3]
            out = model.render(views.c2w[view:view + 1], views.Ks[view:view + 1], width, height)
            target = views.images[view:view + 1]
            if views.masks is not None:
                # Untrusted pixels get the render itself (detached) as their target: L1 and D-SSIM are at their
                # minimum there, so no gradient pulls towards what the stale image shows, and the SSIM windows keep
                # their shape (zeroing the pixels instead would teach black).
                target = torch.where(views.masks[view:view + 1, ..., None], target, out["rgb"].detach())
            loss_rgb = rgb_loss(out["rgb"], target, config.ssim_weight)
            loss_feat = torch.zeros((), device=device)
            if views.features:
                if views.masks is None:
                    us = rng.integers(0, width, config.feature_samples)
                    vs = rng.integers(0, height, config.feature_samples)
                else:   # uniform among the trusted pixels, with replacement as above (the sampler skips views without)
                    trusted = np.flatnonzero(views.masks[view].cpu().numpy())
                    vs, us = np.divmod(trusted[rng.integers(0, len(trusted), config.feature_samples)], width)
                rendered = out["queries"][0, torch.from_numpy(vs).to(device), torch.from_numpy(us).to(device)]
                for name, feats in views.features.items():
                    decoded = attentions[name](rendered[:, model.query_slice(name)])
                    raw = sample_features(feats, view, us, vs, width, height).to(device)
                    loss_feat = loss_feat + feature_loss(decoded, raw)
            loss = loss_rgb + config.feature_weight * loss_feat
            self.strategy.step_pre_backward(model.params, optimizers, self.strategy_state, step, out["meta"])
            loss.backward()
            for opt in [*optimizers.values(), *self.extra_optimizers]:
                opt.step()
                opt.zero_grad(set_to_none=True)
            for group in optimizers["means"].param_groups:
                group["lr"] *= means_decay
            self.strategy.step_post_backward(model.params, optimizers, self.strategy_state, step, out["meta"],
                                             packed=False)
            if d.reset_opacity and 0 < step < d.refine_stop_iter and step % d.reset_every == 0:
                reset_opacities(model.params, optimizers["opacities"], 2 * d.prune_opa)
            last = {"loss": loss.item(), "rgb": loss_rgb.item(), "feat": loss_feat.item()}
            done = step + 1
            if callback is not None and (done % config.log_every == 0 or done == steps.stop):
                elapsed = time.monotonic() - begin
                rate = elapsed / (done - steps.start)
                callback(Progress(done, steps.stop, last["loss"], last["rgb"], last["feat"], len(model),
                                  elapsed, rate * (steps.stop - done)))
        return last

    def training_state(self, rng: np.random.Generator, order: Sequence[int] = ()) -> dict:
        """What a checkpoint keeps to continue this optimisation: optimiser and strategy states, `rng`, the views
        left in the current pass `order`."""
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "extra_optimizers": [opt.state_dict() for opt in self.extra_optimizers],
            "strategy": {k: v for k, v in self.strategy_state.items() if k != "scene_scale"},
            "rng": rng.bit_generator.state,
            "order": list(order),
        }


def train(scene: Scene, features: dict[str, ViewFeatures], config: TrainConfig, output: str | Path,
          callback: Callable[[Progress], None] | None = None, should_cancel: Callable[[], bool] | None = None,
          resume: str | Path | None = None, decoders: DecoderBuilder | None = None,
          record: dict | None = None) -> Memory:
    """Train a memory on `scene` and write it to `output` (atomically). `callback` gets a Progress every `log_every`
    iterations; `should_cancel()` is polled every iteration; `resume` continues a checkpoint written by this function.
    `decoders(features, training view indices)` builds each model's decoder (`[P, l] → [P, d]`; moved to the training
    device here, its trainable parameters learned at `config.lr.wm`); default: M3's memory attention, `build_attention`.
    `record` is stored in the checkpoint's config beside the settings (what the memory is, e.g. a baseline's method).
    The memory's `sources` record `scene` and the views trained on (`scan_source`); `online.update` appends to them.
    """
    if len(scene) == 0:
        raise M3Error("the scene has no frames: record or load one with posed images")
    for name, feats in features.items():
        if len(feats.maps) != len(scene):
            raise M3Error(f"model {name!r} has features for {len(feats.maps)} views, the scene has {len(scene)}")
    config.validate()   # also for configs built in code, not through from_dict
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    viewset = ViewSet.from_scene(scene, features, device)
    n_views, height, width = viewset.images.shape[:3]
    scale = scene_scale(scene.c2w)
    train_views = training_views(n_views, config.holdout_every)

    if resume is not None:
        memory, state = load_memory(resume, device)
        if state is None:
            raise M3Error(f"{resume} holds no training state to resume from (it was saved for serving only)")
        model, attentions, start = memory.gaussians, memory.attentions, memory.iteration
        if start >= config.iterations:
            raise M3Error(f"{resume} is already trained for {start} iterations; ask for more than {start} to resume")
    else:
        xyz, rgb = initial_points(scene, config.init, stride=config.init_stride,
                                  max_points=config.init_max_points, seed=config.seed, views=train_views)
        model = GaussianModel.from_points(xyz, rgb, {name: config.query_dim for name in features}, config.gaussians,
                                          seed=config.seed, query_layout=config.query_layout).to(device)
        if decoders is None:
            attentions = {name: build_attention(name, feats, config, device, train_views, model.query_width(name))
                          for name, feats in features.items()}
        else:
            attentions = {name: decoder.to(device) for name, decoder in decoders(features, train_views).items()}
        state, start = None, 0
    loop = TrainingLoop(model, attentions, config, scale, config.densify, state)
    if state is not None:
        rng.bit_generator.state = state["rng"]
    order: list[int] = list(state["order"]) if state is not None else []

    def sample() -> tuple[ViewSet, int]:
        if not order:
            order.extend(rng.permutation(train_views).tolist())
        return viewset, order.pop()

    begin = time.monotonic()
    last = loop.run(range(start, config.iterations), sample, rng,
                    means_decay=config.lr.means_final ** (1.0 / max(config.iterations, 1)), callback=callback,
                    should_cancel=should_cancel)
    views = TrainingViews(scene.c2w[train_views], scene.Ks[train_views], width, height)
    memory = Memory(model, attentions, {name: f.identity for name, f in features.items()}, scene.world_frame,
                    {**asdict(config), **(record or {})}, config.iterations, views,
                    memory.sources if resume is not None else [scan_source(scene, train_views)])
    memory.config["final"] = {**last, "train_s": time.monotonic() - begin,
                              "psnr": training_psnr(model, viewset.c2w[train_views], viewset.Ks[train_views],
                                                    viewset.images[train_views])}
    save_memory(output, memory, loop.training_state(rng, order))
    return memory


def training_psnr(model: GaussianModel, c2w, Ks, images, max_views: int = 8) -> float:
    """Mean PSNR over up to `max_views` evenly spaced training views `images: [n, H, W, 3]`."""
    views = np.unique(np.linspace(0, len(images) - 1, min(max_views, len(images))).round().astype(int))
    height, width = images.shape[1:3]
    with torch.no_grad():
        return float(np.mean([psnr(model.render(c2w[v:v + 1], Ks[v:v + 1], width, height)["rgb"], images[v:v + 1])
                              for v in views]))
