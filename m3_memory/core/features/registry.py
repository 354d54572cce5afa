"""Feature models by name: `FeatureModelConfig`s from YAML (`config/features.yaml`) and a kind -> class registry."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import yaml

from m3_memory.core.features.base import FeatureExtractor, FeatureModelError
from m3_memory.core.resources import package_file, share_file

PACKAGE_DIR = package_file("core/features")
DEFAULT_CONFIG = share_file("config/features.yaml")
PACKAGE_PREFIX = "package:"  # weights path relative to m3_memory/core/features/ (weights shipped in the repo)

_KINDS: dict[str, type[FeatureExtractor]] = {}


@dataclass(frozen=True)
class FeatureModelConfig:
    """One named feature model.

    `kind` picks the class (`open_clip`, `timm_vit`, `tinyvlm`, `regions`); `arch` the architecture within it;
    `weights` a file path (`~` expanded; relative to the YAML file; `package:` = shipped in m3_memory/core/features/);
    `pretrained` names published weights (an open_clip tag such as `openai`, or `hf-hub:org/name`) read offline from
    the download cache (`cache_dir`, default the library's own); `device` is `auto` (cuda when available), `cpu` or
    `cuda[:N]`;
    `min_side` upscales smaller images first (None = one tile); `allow_random_init` lets a model without weights run
    with random ones (tests only: identity says RANDOM-INIT).
    `options` holds kind-specific settings. `psc_threshold` is Algorithm 1's cosine θ for memories of this model
    (features that vary little need a θ close to 1; a region model, one embedding per segment, ~0.9999).
    """

    name: str
    kind: str
    arch: str = ""
    weights: str | None = None
    pretrained: str | None = None
    cache_dir: str | None = None
    tile_size: int | None = 224
    min_side: int | None = None
    output_stride: int = 4
    batch_size: int = 8
    device: str = "auto"
    allow_random_init: bool = False
    options: dict = field(default_factory=dict)
    psc_threshold: float | None = None
    base_dir: Path = PACKAGE_DIR

    def weights_path(self) -> Path | None:
        """Resolved weights file path (which may not exist), or None when none is configured."""
        if not self.weights:
            return None
        if self.weights.startswith(PACKAGE_PREFIX):
            return PACKAGE_DIR / self.weights[len(PACKAGE_PREFIX) :]
        return self._path(self.weights)

    def cache_path(self) -> Path | None:
        """Resolved `cache_dir`, or None for the library's default download cache."""
        return self._path(self.cache_dir) if self.cache_dir else None

    def _path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def register_kind(kind: str) -> Callable[[type[FeatureExtractor]], type[FeatureExtractor]]:
    """Class decorator: make `kind` in a config build this extractor class (constructor takes a FeatureModelConfig)."""

    def add(cls: type[FeatureExtractor]) -> type[FeatureExtractor]:
        _KINDS[kind] = cls
        return cls

    return add


def _import_kinds() -> None:
    # Importing the model modules registers their kinds; done lazily so `registry` stays light.
    from m3_memory.core.features import open_clip_model, regions, timm_model, tinyvlm  # noqa: F401


def load_configs(path: str | Path | None = None) -> tuple[str, dict[str, FeatureModelConfig]]:
    """Read a features YAML -> `(default model name, {name: FeatureModelConfig})`."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise FeatureModelError(f"feature config {path} not found; pass --config or create it (see {DEFAULT_CONFIG})")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(FeatureModelConfig)} - {"name", "base_dir"}
    configs = {}
    for name, entry in (data.get("models") or {}).items():
        unknown = set(entry) - known
        if unknown:
            raise FeatureModelError(
                f"{path}: model {name!r} has unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        configs[name] = FeatureModelConfig(name=name, base_dir=path.parent, **entry)
    default = data.get("default")
    if default not in configs:
        raise FeatureModelError(f"{path}: default model {default!r} is not among models {sorted(configs)}")
    return default, configs


def create_extractor(config: FeatureModelConfig, config_path: str | Path | None = None) -> FeatureExtractor:
    """Build the extractor a config describes (`config_path` lets wrapper kinds look up the models they wrap).

    `device: auto` becomes cuda when this machine has it, else cpu, before the model class sees the config.
    """
    from m3_memory.core.trainer import ConfigError, resolve_device  # one device rule for training and features

    _import_kinds()
    if config.kind not in _KINDS:
        raise FeatureModelError(f"model {config.name!r}: unknown kind {config.kind!r}; known kinds: {sorted(_KINDS)}")
    try:
        device = resolve_device(str(config.device))
    except ConfigError as exc:
        raise FeatureModelError(f"model {config.name!r}: {exc}") from exc
    return _KINDS[config.kind](replace(config, device=str(device)), config_path=config_path)


def build_extractor(name: str | None = None, config_path: str | Path | None = None, **overrides) -> FeatureExtractor:
    """The extractor `name` (default: the config's default) from the features YAML, fields overridden by kwargs."""
    default, configs = load_configs(config_path)
    name = name or default
    if name not in configs:
        raise FeatureModelError(f"no feature model {name!r} in the config; configured: {sorted(configs)}")
    return create_extractor(replace(configs[name], **overrides), config_path)
