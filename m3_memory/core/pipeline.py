"""Configuration loading and feature preparation shared by every way of training (CLI, trainer node, benchmarks)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from m3_memory.core.resources import share_file

if TYPE_CHECKING:   # imported when used: building the parser of a verb must not load torch
    from m3_memory.core.features import FeatureCache, FeatureExtractor

DEFAULT_TRAIN_CONFIG = share_file("config/train.yaml")


def parse_overrides(items: list[str]) -> dict:
    """`["iterations=500", "densify.refine_every=50"]` → nested dict with YAML-typed values."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {item!r} must be written key=value")
        node = out
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"setting {item!r}: {parent!r} is set to a value and cannot hold {leaf!r}")
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key (a mapping given for a plain value replaces it,
    so that the settings check names the setting)."""
    merged = dict(base)
    for key, value in overrides.items():
        inner = merged.get(key)
        merged[key] = merge(inner if isinstance(inner, dict) else {}, value) if isinstance(value, dict) else value
    return merged


def load_train_config(path: Path | None, overrides: dict):
    """The training config: the dataclass defaults, `path` (default config/train.yaml), then `overrides`."""
    from m3_memory.core.trainer import TrainConfig

    path = Path(path or DEFAULT_TRAIN_CONFIG)
    base = yaml.safe_load(path.read_text()) or {}
    return TrainConfig.from_dict(merge(base, overrides))


class Extractors:
    """The feature extractors of `models` and their feature caches, each built on first use and kept while this
    object lives: a job that extracts repeatedly (a live job, at every step) owns one, as building a model takes
    seconds (CLIP) and a fresh cache re-hashes every entry it opens. `device` (the training's) runs every model
    there; None or auto leaves each model's own `device` setting (itself auto by default)."""

    def __init__(self, models: list[str], device: str | None = None):
        self.models = list(models)
        self.overrides = {} if device in (None, "auto") else {"device": device}
        self._extractors: dict[str, FeatureExtractor] = {}
        self._caches: dict[tuple[str, Path], FeatureCache] = {}   # by model and features folder

    def extractor(self, name: str) -> FeatureExtractor:
        from m3_memory.core.features.registry import build_extractor

        if name not in self._extractors:
            self._extractors[name] = build_extractor(name, **self.overrides)
        return self._extractors[name]

    def scene_features(self, scene, scene_dir: Path, progress=None) -> dict:
        """Cached dense features of every view for each model → `{name: ViewFeatures}`; `progress(model)` gives the
        `extract_scene` progress callback of each model. Only views new to the cache are extracted."""
        from m3_memory.core.features.cache import FeatureCache, extract_scene
        from m3_memory.core.trainer import ViewFeatures

        features = {}
        for name in self.models:
            extractor = self.extractor(name)
            key = (name, Path(scene_dir) / "features")
            if key not in self._caches:
                self._caches[key] = FeatureCache(key[1], extractor)
            maps = extract_scene(scene, extractor, self._caches[key],
                                 progress=None if progress is None else progress(name))
            features[name] = ViewFeatures(identity=extractor.identity.to_json(), maps=maps)
        return features


def scene_features(scene, scene_dir: Path, models: list[str], progress=None, device: str | None = None) -> dict:
    """`Extractors(models, device).scene_features(scene, scene_dir, progress)`: for one extraction (the models are
    built for it and dropped after)."""
    return Extractors(models, device).scene_features(scene, scene_dir, progress)
