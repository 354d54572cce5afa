"""Online memory (issue #15): extend a trained memory with the views of a new scan without retraining it.

An update, in this order:

1. **Change**: the Gaussians that the new views see through (`change.seen_through`: the camera observes space
   behind them, over several views) are removed, with their optimiser and densification state.
2. **Gaussians**: the new views are rendered from what is left; every `seed_stride`-th pixel with observed depth that
   the memory does not explain (rendered alpha below `seed_alpha`, or rendered depth behind the observed one by
   more than `seed_depth_tolerance` of it: a surface the memory lacks; rendered depth *in front* of the observation is
   left to the change step, and is common anyway, as blended depth leans towards the camera) is back-projected into
   a new Gaussian, initialised as at the start of training
   (`GaussianModel.from_points`: the image's colour, scale from the neighbouring seeds, fresh principal queries).
   Existing Gaussians keep their Adam moments; new ones start at zero.
   The replayed old views are stale where the place changed: they still show what was pruned (a moved object at
   its old place) and do not show what has appeared (the new Gaussians that their own depth sees through,
   `appeared_in`: the object's new place). Both sets are rendered alone into each old view, and the pixels they
   cover (`stale_pixels`) are not trusted in training (no RGB gradient towards them, no feature samples there), or
   the refinement would grow the old place back and wipe the new one out.
3. **Bank**: per model, the new views' Algorithm 1 rows (`trainer.psc_input`) that no existing component covers
   (cosine ≥ θ) go through Algorithm 1 among themselves; what it keeps is appended to the bank (`extend_bank`).
   Existing rows never move and Wm is unchanged, so every old query decodes as before.
4. **Training**: `UpdateConfig.iterations` steps of the batch training loop (`trainer.TrainingLoop`), each on a new
   view with probability `new_view_share`, else on a replayed old view, so the rest of the scene does not drift.
   The means' learning rate continues at the saved one (no further decay); densification runs on
   `UpdateConfig.densify`'s schedule, in the update's own step numbers (grow/prune only; no opacity reset, which
   would wipe the old scene's opacities in a few hundred steps).

The memory records each scan that built it (`Memory.sources`, `trainer.scan_source`) with this update's figures.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from m3_memory.core.change import ChangeConfig, seen_through
from m3_memory.core.checkpoint import Memory, save_memory
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import GaussianModel
from m3_memory.core.geometry import backproject_pixels
from m3_memory.core.memory import MemoryAttention, PSCConfig, principal_scene_components
from m3_memory.core.memory.psc import unit_rows
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import (DensifyConfig, Progress, TrainConfig, TrainingLoop, ViewFeatures, ViewSet,
                                    psc_input, resolve_device, scan_source, scene_scale, settings_from_dict,
                                    training_psnr)
from m3_memory.core.views import TrainingViews


class UpdateError(M3Error):
    """An update that cannot run on this memory (a decoder without a bank, other models, another image size, ...)."""


@dataclass
class SceneViews:
    """Posed views of one scan with their features: what an update adds (`new`) or replays (`old`)."""
    scene: Scene
    features: dict[str, ViewFeatures]   # every view of `scene` (as trainer.train takes them)
    views: np.ndarray                   # [k] indices into scene of the views meant
    source: str                         # the scan's id or path, recorded in the memory's provenance


def _update_densify() -> DensifyConfig:
    return DensifyConfig(refine_start_iter=100, refine_stop_iter=350, refine_every=100, reset_opacity=False)


@dataclass
class UpdateConfig:
    """Settings of one update (the training settings, θ per model included, are the memory's TrainConfig)."""
    iterations: int = 400               # a fifth of the batch schedule (2000)
    new_view_share: float = 0.6         # share of the iterations sampling new views; the rest replays old ones
    seed_alpha: float = 0.5             # pixels of new views rendered with alpha below this are unexplained...
    seed_depth_tolerance: float = 0.1   # ...or whose rendered depth lies behind the observed one by more (relative)
    seed_stride: int = 4                # every k-th pixel (both axes) is a seed candidate, as init_stride
    seed_max_points: int = 20_000       # at most this many new Gaussians (random, seeded subsample)
    prune: bool = True                  # remove the Gaussians the new views see through (change detection)
    stale_alpha: float = 0.2            # old views' pixels where the changed Gaussians alone render more alpha are
    stale_dilate_px: int = 5            # stale, then grown by this many: the soft silhouette and what the new ones
                                        # grow into while refining (at 2, the tiny moved-duck test lost 1 seed in 3)
    change: ChangeConfig = field(default_factory=ChangeConfig)
    densify: DensifyConfig = field(default_factory=_update_densify)   # in update steps; reset_opacity stays off

    @classmethod
    def from_dict(cls, data: dict) -> "UpdateConfig":
        """Settings from a mapping, checked as TrainConfig.from_dict checks its own (ConfigError naming a bad one)."""
        config = settings_from_dict(cls, data, "update")
        config.validate()
        return config

    def validate(self) -> None:
        from m3_memory.core.trainer import ConfigError

        if self.iterations < 1 or self.seed_stride < 1 or self.seed_max_points < 0:
            raise ConfigError(f"update needs iterations ≥ 1, seed_stride ≥ 1 and seed_max_points ≥ 0, got "
                              f"{self.iterations}, {self.seed_stride}, {self.seed_max_points}")
        if not 0 < self.new_view_share <= 1:
            raise ConfigError(f"update.new_view_share must lie in (0, 1], got {self.new_view_share}")
        if not (0 <= self.seed_alpha <= 1 and self.seed_depth_tolerance > 0):
            raise ConfigError(f"update.seed_alpha must lie in [0, 1] and seed_depth_tolerance be positive, got "
                              f"{self.seed_alpha}, {self.seed_depth_tolerance}")
        if not (0 < self.stale_alpha < 1 and self.stale_dilate_px >= 0):
            raise ConfigError(f"update.stale_alpha must lie in (0, 1) and stale_dilate_px be ≥ 0, got "
                              f"{self.stale_alpha}, {self.stale_dilate_px}")


def train_config_of(memory: Memory, overrides: dict | None = None) -> TrainConfig:
    """The TrainConfig a memory was trained with (its recorded settings; ones this version added take their
    defaults, ones it dropped are ignored), with `overrides` (a nested mapping) over it."""
    from m3_memory.core.pipeline import merge

    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig.from_dict(merge({k: v for k, v in memory.config.items() if k in known}, overrides or {}))


# --- Gaussians: remove, seed, append (parameters, Adam state and gsplat's running state together) ---

@torch.no_grad()
def recorded_views(memory: Memory, skip: Path | None = None) -> dict[str, np.ndarray]:
    """The scans that built `memory` (its provenance), each with the sorted views it gave (a scan updated several
    times, as in live mode, appears once); `skip` (the scan being added) is left out."""
    views: dict[str, set[int]] = {}
    for entry in memory.sources:
        if skip is None or Path(entry["source"]).resolve() != Path(skip).resolve():
            views.setdefault(entry["source"], set()).update(entry["views"])
    return {source: np.array(sorted(indices), dtype=np.int64) for source, indices in views.items()}


def append_gaussians(loop: TrainingLoop, new: dict[str, Tensor]) -> None:
    """Append Gaussians `new` (every parameter name of the model, `[n, ...]`) to `loop`'s model: their Adam moments
    start at zero, existing ones keep theirs; gsplat's running statistics get zero rows."""
    from gsplat.strategy.ops import _update_param_with_optimizer

    n = len(new["means"])
    if n == 0:
        return

    def param_fn(name: str, p: Tensor) -> Tensor:
        return torch.nn.Parameter(torch.cat([p, new[name].to(p)]), requires_grad=p.requires_grad)

    def optimizer_fn(key: str, v: Tensor) -> Tensor:
        return torch.cat([v, v.new_zeros((n, *v.shape[1:]))])

    _update_param_with_optimizer(param_fn, optimizer_fn, loop.model.params, loop.optimizers)
    for key, value in loop.strategy_state.items():
        if isinstance(value, Tensor):
            loop.strategy_state[key] = torch.cat([value, value.new_zeros((n, *value.shape[1:]))])


@torch.no_grad()
def remove_gaussians(loop: TrainingLoop, mask: Tensor) -> None:
    """Remove the Gaussians where `mask: [N]` bool is set, with their optimiser and strategy state (gsplat's op)."""
    from gsplat.strategy.ops import remove

    if bool(mask.any()):
        remove(loop.model.params, loop.optimizers, loop.strategy_state, mask)


@torch.no_grad()
def unexplained_points(model: GaussianModel, views: ViewSet, depths: Sequence[np.ndarray | None],
                       indices: Sequence[int], update: UpdateConfig) -> tuple[np.ndarray, np.ndarray]:
    """World points `[P, 3]` and colours `[P, 3]` in [0, 1] of the pixels of views `indices` of `views` that `model`
    does not explain: every `seed_stride`-th pixel with observed depth (`depths[i]: [H, W]` metres, 0 = none; None:
    the view has no depth) where the rendered alpha is below `seed_alpha` or the rendered depth lies behind the
    observed one by more than `seed_depth_tolerance` × the observed depth (module docstring: why one-sided)."""
    stride = update.seed_stride
    height, width = views.images.shape[1:3]
    xyz, rgb = [], []
    for i, depth in zip(indices, depths):
        if depth is None:
            continue
        out = model.render(views.c2w[i:i + 1], views.Ks[i:i + 1], width, height)
        alpha = out["alpha"][0, ::stride, ::stride, 0].cpu().numpy()
        rendered = out["depth"][0, ::stride, ::stride, 0].cpu().numpy()
        observed = depth[::stride, ::stride]
        off = rendered - observed > update.seed_depth_tolerance * observed
        vs, us = np.nonzero((observed > 0) & ((alpha < update.seed_alpha) | off))
        vs, us = vs * stride, us * stride
        xyz.append(backproject_pixels(us, vs, depth[vs, us], views.Ks[i].double().cpu().numpy(),
                                      views.c2w[i].double().cpu().numpy()))
        rgb.append(views.images[i, vs, us].cpu().numpy())
    if not xyz:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    return np.concatenate(xyz).astype(np.float32), np.concatenate(rgb).astype(np.float32)


def gaussians_where(model: GaussianModel, mask: Tensor) -> GaussianModel:
    """A detached GaussianModel of `model`'s Gaussians where `mask: [N]` bool is set (to render them alone)."""
    return GaussianModel({k: v[mask].detach() for k, v in model.params.items()}, model.query_dims, model.sh_degree,
                         model.query_layout)


@torch.no_grad()
def stale_pixels(changed: Sequence[GaussianModel], views: ViewSet, indices: Sequence[int], update: UpdateConfig
                 ) -> Tensor:
    """`[n, H, W]` bool over all n views of `views`, True where views `indices` show any of the Gaussians `changed`
    (gone since they were taken, or appeared): where one set alone renders with alpha above `stale_alpha`, grown by
    `stale_dilate_px`. Rendered one view at a time; hidden parts count too, which only marks a few more pixels."""
    n, height, width = views.images.shape[:3]
    stale = torch.zeros((n, height, width), dtype=torch.bool, device=views.images.device)
    k = update.stale_dilate_px
    for i in indices:
        covered = torch.zeros((1, height, width), device=views.images.device)
        for gaussians in changed:
            if len(gaussians):
                alpha = gaussians.render(views.c2w[i:i + 1], views.Ks[i:i + 1], width, height)["alpha"][..., 0]
                covered = torch.maximum(covered, (alpha > update.stale_alpha).float())   # [1, H, W]
        if k:
            covered = torch.nn.functional.max_pool2d(covered[None], 2 * k + 1, stride=1, padding=k)[0]
        stale[i] = covered[0] > 0
    return stale


@torch.no_grad()
def appeared_in(seeds: GaussianModel, old: Sequence[SceneViews], update: UpdateConfig) -> Tensor:
    """`[N]` bool: the new Gaussians `seeds` that the old scans' views (with depth) see through, so were not there
    when those were taken (a moved object's new place): `change.seen_through` with the roles of the scans swapped."""
    device = seeds.params["means"].device
    frames = [(scan.scene, int(i), scan.scene.depth(int(i))) for scan in old for i in np.asarray(scan.views)]
    frames = [frame for frame in frames if frame[2] is not None]
    if not frames:
        return torch.zeros(len(seeds), dtype=torch.bool, device=device)

    def stacked(values) -> Tensor:
        return torch.from_numpy(np.stack(values)).float().to(device)

    height, width = frames[0][2].shape
    return seen_through(seeds, stacked([s.c2w[i] for s, i, _ in frames]), stacked([s.Ks[i] for s, i, _ in frames]),
                        stacked([d for _, _, d in frames]), width, height, update.change)


# --- the bank ---

@torch.no_grad()
def covered_rows(bank: Tensor, rows: Tensor, threshold: float, chunk: int = 8192) -> Tensor:
    """`[N]` bool: the rows `[N, d]` within cosine ≥ `threshold` of some bank row `[t, d]` (float64-normalised rows,
    float32 products)."""
    keys = unit_rows(bank).float()
    unit = unit_rows(rows).float()
    return torch.cat([(unit[s:s + chunk] @ keys.T).amax(dim=1) >= threshold for s in range(0, len(unit), chunk)]
                     ) if len(unit) else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def extend_bank(attention: MemoryAttention, rows: np.ndarray, psc: PSCConfig) -> dict:
    """Append to `attention`'s bank the principal components of the rows `[N, d]` it does not cover.

    The rows covered by an existing component (cosine ≥ θ) are dropped; Algorithm 1 runs on the others alone and
    its components are appended after the existing ones, which never move (Wm is unchanged). This differs from batch
    Algorithm 1 on all old and new rows: (a) the old components stay, even where batch would have picked another
    row of the same neighbourhood once new rows joined the walk; (b) a new row is dropped only when it lies within θ
    of a *component*, while batch also rejects a row that merely shares a neighbour with a used row, so the
    incremental bank is at least as fine and usually a little larger. Old rows are not stored, so (b) cannot be
    matched exactly. Returns `{"rows", "uncovered", "added", "bank"}` counts.
    """
    bank = attention.psc
    candidates = torch.from_numpy(rows).to(bank.device)
    keep = ~covered_rows(bank, candidates, psc.threshold)
    uncovered = candidates[keep]
    added = 0
    if len(uncovered):
        components = principal_scene_components(uncovered, psc).components.to(bank)
        attention.psc = torch.cat([bank, components])   # the registered buffer, replaced
        added = len(components)
    return {"rows": len(rows), "uncovered": int(keep.sum()), "added": added, "bank": attention.bank_size}


# --- the update ---

def _check_inputs(memory: Memory, new: SceneViews, old: Sequence[SceneViews]) -> None:
    for name, decoder in memory.attentions.items():
        if not isinstance(decoder, MemoryAttention):
            raise UpdateError(f"model {name!r} decodes with a {type(decoder).__name__}, which has no bank to extend: "
                              "only M3 memories (memory attention) can be updated")
    size = (memory.views.width, memory.views.height)
    for scan in (new, *old):
        if set(scan.features) != set(memory.models):
            raise UpdateError(f"{scan.source}: features of {sorted(scan.features)}, the memory holds "
                              f"{sorted(memory.models)}")
        for name, feats in scan.features.items():
            if len(feats.maps) != len(scan.scene):
                raise UpdateError(f"{scan.source}: model {name!r} has features for {len(feats.maps)} views, the "
                                  f"scene has {len(scan.scene)}")
        if (scan.scene.meta.width, scan.scene.meta.height) != size:
            raise UpdateError(f"{scan.source} is {scan.scene.meta.width}x{scan.scene.meta.height}, the memory was "
                              f"trained on {size[0]}x{size[1]} views")
        if scan.scene.world_frame != memory.world_frame:
            raise UpdateError(f"{scan.source} is in frame {scan.scene.world_frame!r}, the memory in "
                              f"{memory.world_frame!r}")
        views = np.asarray(scan.views)
        if len(views) == 0 or views.min() < 0 or views.max() >= len(scan.scene):
            raise UpdateError(f"{scan.source}: views must be a non-empty list of indices below {len(scan.scene)}")


def _sampler(new: tuple[ViewSet, np.ndarray], old: list[tuple[ViewSet, np.ndarray]], share: float,
             rng: np.random.Generator) -> Callable[[], tuple[ViewSet, int]]:
    """Each call: a new view with probability `share` (or always, without old views), else an old one; each pool is
    walked in shuffled passes, so every view comes up equally often. Old views without a trusted pixel are left out."""
    pools = [[(new[0], int(v)) for v in new[1]],
             [(views, int(v)) for views, idx in old for v in idx if views.masks is None or bool(views.masks[v].any())]]
    orders: list[list[int]] = [[], []]

    def sample() -> tuple[ViewSet, int]:
        pool = 0 if not pools[1] or rng.random() < share else 1
        if not orders[pool]:
            orders[pool] = rng.permutation(len(pools[pool])).tolist()
        return pools[pool][orders[pool].pop()]

    return sample


def update(memory: Memory, training_state: dict | None, new: SceneViews, old: Sequence[SceneViews],
           config: TrainConfig, update: UpdateConfig, output: str | Path,
           callback: Callable[[Progress], None] | None = None, should_cancel: Callable[[], bool] | None = None
           ) -> Memory:
    """Extend `memory` with the views `new` (bank rows, Gaussians, bounded refinement replaying `old`), prune what the
    new views see through (core.change.seen_through), write it with its training state to `output` atomically.

    `training_state` (from `load_memory`) keeps the existing Gaussians' Adam moments and learning rates; without it
    the optimisers start fresh at the means' final learning rate. `config`: the memory's training settings
    (`train_config_of`). `callback` gets a Progress every `log_every` update steps; `should_cancel()` is polled every
    step (TrainingCancelled: nothing is written, but `memory` has been changed). `memory`'s Gaussians and banks are
    extended in place; the returned Memory shares them. Module docstring: the steps and how they differ from batch.
    """
    _check_inputs(memory, new, old)
    config.validate()
    update.validate()
    started = time.monotonic()
    device = resolve_device(config.device)
    model = memory.gaussians.to(device)
    attentions = {name: a.to(device) for name, a in memory.attentions.items()}
    rng = np.random.default_rng(config.seed + len(memory.sources))
    torch.manual_seed(config.seed + len(memory.sources))   # gsplat's splits draw from it: reproducible, as train
    cameras = np.concatenate([memory.views.c2w, new.scene.c2w[new.views]])
    scale = scene_scale(cameras)
    loop = TrainingLoop(model, attentions, config, scale, update.densify, training_state)
    if training_state is None:
        for group in loop.optimizers["means"].param_groups:
            group["lr"] *= config.lr.means_final   # where a batch training ends
    new_set = ViewSet.from_scene(new.scene, new.features, device)
    old_sets = [(ViewSet.from_scene(scan.scene, scan.features, device), np.asarray(scan.views)) for scan in old]
    views = np.asarray(new.views)
    height, width = new_set.images.shape[1:3]
    depths = [new.scene.depth(int(i)) for i in views]
    figures = {"gaussians_before": len(model)}

    pruned = torch.zeros(len(model), dtype=torch.bool, device=device)
    changed: list[GaussianModel] = []   # what has gone, and then what has appeared, since the old scans
    if update.prune and any(d is not None for d in depths):
        observed = np.stack([np.zeros((height, width), np.float32) if d is None else d for d in depths])
        pruned = seen_through(model, new_set.c2w[views], new_set.Ks[views], torch.from_numpy(observed).to(device),
                              width, height, update.change)
        if bool(pruned.all()):
            raise UpdateError(f"{new.source}: the new views see through every Gaussian of the memory (another place, "
                              "or the world frames disagree): train a new memory instead")
        if bool(pruned.any()):
            changed.append(gaussians_where(model, pruned))
        remove_gaussians(loop, pruned)
    figures["pruned"] = int(pruned.sum())

    xyz, rgb = unexplained_points(model, new_set, depths, views, update)
    if len(xyz) > update.seed_max_points:
        keep = np.sort(rng.choice(len(xyz), update.seed_max_points, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
    figures["seeded"] = len(xyz) if len(xyz) >= 2 else 0
    if figures["seeded"]:
        seeds = GaussianModel.from_points(xyz, rgb, model.query_dims, replace(config.gaussians,
                                          sh_degree=model.sh_degree), seed=int(rng.integers(2**31)),
                                          query_layout=model.query_layout)
        append_gaussians(loop, dict(seeds.params))
        if update.prune and old:
            seeds = seeds.to(device)
            appeared = appeared_in(seeds, old, update)
            figures["appeared"] = int(appeared.sum())
            if bool(appeared.any()):
                changed.append(gaussians_where(seeds, appeared))

    # The replayed views still show what has gone and not what has appeared: not to be taught back (module docstring).
    if changed and old_sets:
        for old_set, old_views in old_sets:
            old_set.masks = ~stale_pixels(changed, old_set, old_views, update)
        figures["stale_pixels"] = sum(int((~s.masks[v]).sum()) for s, v in old_sets)

    figures["bank"] = {}
    for name, feats in new.features.items():
        rows, psc = psc_input(name, feats, config, views)
        figures["bank"][name] = extend_bank(attentions[name], rows, psc)

    sampler = _sampler((new_set, views), old_sets, update.new_view_share, rng)
    refine_started = time.monotonic()
    last = loop.run(range(update.iterations), sampler, rng, callback=callback, should_cancel=should_cancel)
    figures.update(refine_s=time.monotonic() - refine_started, update_s=time.monotonic() - started,
                   gaussians=len(model), iterations=update.iterations)

    trained = TrainingViews(cameras, np.concatenate([memory.views.K, new.scene.Ks[views]]), width, height)
    source = {**scan_source(new.scene, views, new.source), "update": {**figures, "config": asdict(update)}}
    result = Memory(model, attentions, memory.identities, memory.world_frame, dict(memory.config),
                    memory.iteration + update.iterations, trained, [*memory.sources, source])
    result.config["final"] = {**last, "train_s": figures["update_s"],
                              "psnr": training_psnr(model, new_set.c2w[views], new_set.Ks[views],
                                                    new_set.images[views])}
    save_memory(output, result, loop.training_state(rng))
    return result
