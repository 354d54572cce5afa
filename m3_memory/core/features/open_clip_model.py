"""CLIP (and other open_clip ViTs) with MaskCLIP dense features that stay in the joint image-text space.

MaskCLIP (Zhou et al. 2022), as the M3 authors use it for ViT-L/14: the last transformer block's query-key mixing
smooths every patch token towards the class token, so for each patch we take only the block's value path
(ln_1 -> value projection -> out projection), then `ln_post` and the visual projection `proj`: the same head that maps
the class token into the text space, now applied per patch, so a text embedding scores every patch. The pooled
embedding runs the same trunk and head on the class token through the whole last block (= open_clip's encode_image).

Weights are a local open_clip checkpoint (`weights:`) or published ones named by `pretrained:` (an open_clip tag such
as `openai`, or `hf-hub:org/name`), found where open_clip 3.x downloads them (`locate_pretrained`). Loading never
touches a network: missing weights fail at once with the command that fetches them and the path they must land in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_memory.core.features.base import (
    FeatureExtractor,
    FeatureModelError,
    WeightsMissingError,
    force_offline,
    warn_random_init,
)
from m3_memory.core.features.registry import FeatureModelConfig, register_kind
from m3_memory.core.storage import file_sha256

HF_HUB_PREFIX = "hf-hub:"
URL_CACHE = "~/.cache/clip"  # open_clip's folder for url downloads (also OpenAI's `clip` package's)
HF_CONFIG = "open_clip_config.json"
HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's default order


@dataclass(frozen=True)
class OpenClipSource:
    """What `open_clip.create_model` needs to build a model offline.

    `model_name`: an architecture (`ViT-B-32`) or `local-dir:FOLDER`, a Hugging Face snapshot folder holding
    open_clip_config.json; `checkpoint`: the weights file; `quick_gelu` / `preprocess` (mean, std): the settings of
    the pretrained tag that the file itself does not carry (OpenAI's weights were trained with QuickGELU);
    `published`: the file's sha256 is the one published with it, so it may be read beyond plain tensors (OpenAI's
    own .pt files are TorchScript archives, which `torch.load(weights_only=True)` refuses).
    """

    model_name: str
    checkpoint: Path
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)
    published: bool = False


def hf_cache_root(cache_dir: Path | None) -> Path:
    """The Hugging Face hub cache open_clip downloads into: `cache_dir`, else $HF_HUB_CACHE / $HF_HOME/hub /
    ~/.cache/huggingface/hub (read by huggingface_hub when it is imported)."""
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)


def hf_cached_file(repo_id: str, filenames: tuple[str, ...], cache_dir: Path | None) -> Path | None:
    """The first of `filenames` cached for `repo_id` at its `main` revision (models--ORG--NAME/refs/main ->
    snapshots/REV/FILE), or None; reads the cache folder only."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_root(cache_dir))
        if isinstance(found, str):  # None: not cached; a sentinel: cached as absent on the Hub
            return Path(found)
    return None


def _published_sha256(url: str) -> str:
    """The sha256 (prefix) open_clip checks a url download against: in the URL of OpenAI's and mlfoundations' files."""
    name = os.path.basename(url)
    if "openaipublic" in url:
        return url.split("/")[-2]
    if "mlfoundations" in url:
        return os.path.splitext(name)[0].split("-")[-1]
    return ""


def _hf_fetch(repo_id: str, files: tuple[str, ...], root: Path, instead: str = "") -> str:
    """The command that puts `files` of `repo_id` into the Hugging Face cache `root` (`instead`: the weights file
    open_clip takes when the repository lacks the last of `files`), and where they land."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    return (f"  hf download {repo_id} {' '.join(files)} --cache-dir {root}\n"
            + (f"(a repository without {files[-1]} has {instead}). " if instead else "")
            + f"It lands in {folder}/ (snapshots/<revision>/{files[-1]}, refs/main); fetched on another machine, "
            "copy that folder to the same path here (cp -a keeps its links). `hf` is huggingface_hub's CLI (pip "
            "install huggingface_hub; older versions: huggingface-cli download).")


def _tag_config(arch: str, pretrained: str) -> dict:
    """open_clip's pretrained config of tag `pretrained` for `arch` (hf_hub, url, quick_gelu, mean, std)."""
    import open_clip

    tag = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise FeatureModelError(f"open_clip has no pretrained weights {pretrained!r} for {arch!r}; " + (
            f"its tags: {known}" if known else "it has no tags (see open_clip.list_pretrained())"))
    return tag


def _hf_names(hf_hub: str) -> tuple[str, tuple[str, ...]]:
    """A tag's `hf_hub` entry -> (repo id, weights file names in open_clip's order: the .safetensors twin first)."""
    repo_id, filename = os.path.split(hf_hub)  # open_clip's convention: a trailing slash = the default file name
    filename = filename or HF_WEIGHTS[1]
    if filename == HF_WEIGHTS[1]:
        return repo_id, HF_WEIGHTS
    if filename.endswith((".bin", ".pth")):
        return repo_id, (filename[:-4] + ".safetensors", filename)
    return repo_id, (filename,)


def locate_pretrained(arch: str, pretrained: str, cache_dir: Path | None = None) -> OpenClipSource:
    """The cached weights of open_clip's `pretrained` (a tag of `arch`, or `hf-hub:org/name`), laid out as open_clip
    3.x downloads them: a tag's `hf_hub` repo in the Hugging Face cache (.safetensors before .bin), else its `url`
    file in `cache_dir` or ~/.cache/clip (checked against the published sha256 as open_clip does); `hf-hub:org/name`
    needs the repo's open_clip_config.json and weights of one revision. `cache_dir` replaces both default folders,
    as open_clip's own `cache_dir` does. Raises WeightsMissingError with the fetch command when nothing is there.
    """
    root = hf_cache_root(cache_dir)
    if pretrained.startswith(HF_HUB_PREFIX):
        repo_id = pretrained[len(HF_HUB_PREFIX):].strip("/")
        config = hf_cached_file(repo_id, (HF_CONFIG,), cache_dir)
        weights = hf_cached_file(repo_id, HF_WEIGHTS, cache_dir)
        if config is None or weights is None or weights.parent != config.parent:
            raise WeightsMissingError(
                f"open_clip model {pretrained} is not in the Hugging Face cache {root} (it needs {HF_CONFIG} and "
                f"{' or '.join(HF_WEIGHTS)} of one revision). Nothing is downloaded at run time; on a machine with "
                f"internet run\n" + _hf_fetch(repo_id, (HF_CONFIG, HF_WEIGHTS[0]), root, HF_WEIGHTS[1]))
        return OpenClipSource(f"local-dir:{config.parent}", weights)

    tag = _tag_config(arch, pretrained)
    source = lambda path, published=False: OpenClipSource(  # noqa: E731
        arch, path, bool(tag.get("quick_gelu")), tag, published)
    fetch = []
    if tag.get("hf_hub"):
        repo_id, names = _hf_names(tag["hf_hub"])
        found = hf_cached_file(repo_id, names, cache_dir)
        if found is not None:
            return source(found)
        fetch.append(_hf_fetch(repo_id, names[:1], root, names[1] if len(names) > 1 else ""))
    if tag.get("url"):
        path = Path(cache_dir or URL_CACHE).expanduser() / os.path.basename(tag["url"])
        if path.is_file():
            expected = _published_sha256(tag["url"])
            if expected and not file_sha256(path).startswith(expected):
                raise WeightsMissingError(f"{path} is not the published {arch} {pretrained!r} file (its sha256 "
                                          f"differs from {expected}): fetch it again from {tag['url']}")
            return source(path, published=bool(expected))
        fetch.append(f"Or put {tag['url']} at {path} (where open_clip without huggingface_hub and OpenAI's clip "
                     "package keep it).")
    raise WeightsMissingError(f"open_clip {arch} {pretrained!r} weights are not in the download cache, and nothing "
                              "is downloaded at run time. On a machine with internet run\n" + "\n".join(fetch))


def open_clip_source(config: FeatureModelConfig) -> OpenClipSource | None:
    """Where `config`'s weights are: the `weights:` file (with the settings of the `pretrained:` tag when both are
    given: the file holds that tag's weights) or the cached `pretrained:` weights; None = random init (only with
    allow_random_init). Raises WeightsMissingError saying how to fetch what is missing and where it goes."""
    path = config.weights_path()
    if path is not None and config.pretrained and config.pretrained.startswith(HF_HUB_PREFIX):
        raise FeatureModelError(f"`weights:` and `pretrained: {config.pretrained}` exclude each other (an hf-hub "
                                "model loads from the Hugging Face cache)")
    try:
        if path is None and config.pretrained:
            return locate_pretrained(config.arch, config.pretrained, config.cache_path())
        if path is None:
            raise WeightsMissingError(f"open_clip {config.arch} names no weights: set `pretrained:` (e.g. openai) or "
                                      "`weights:` (a local checkpoint)")
        tag = _tag_config(config.arch, config.pretrained) if config.pretrained else {}
        if path.exists():
            expected = _published_sha256(tag.get("url", ""))
            published = bool(expected) and file_sha256(path).startswith(expected)
            return OpenClipSource(config.arch, path, bool(tag.get("quick_gelu")), tag, published)
        if tag.get("hf_hub"):
            repo_id, names = _hf_names(tag["hf_hub"])
            hint = (f"Fetch it on a machine with internet:\n  hf download {repo_id} {names[0]} --local-dir "
                    f"{path.parent}\n" + ("" if path.name == names[0] else f"and rename it to {path.name} (a .bin "
                                          "or .pt file keeps its extension: open_clip picks the loader by it)"))
        else:
            hint = (f"Put an open_clip checkpoint of {config.arch} there, or name published weights with "
                    "`pretrained:` (e.g. openai; an arch's tags: python -c \"import open_clip; "
                    f"print(open_clip.list_pretrained_tags_by_model('{config.arch}'))\") to load them from the "
                    "download cache.")
        raise WeightsMissingError(f"weights file {path} not found. {hint}")
    except WeightsMissingError:
        if not config.allow_random_init:
            raise
    warn_random_init(config.name)
    return None


@register_kind("open_clip")
class OpenClipExtractor(FeatureExtractor):
    """An open_clip ViT (`config.arch`, e.g. ViT-B-32, ViT-L-14, or the architecture of an `hf-hub:` repo).

    `dense` gives MaskCLIP patch features, `encode_image` CLIP's pooled image embedding, `encode_text` CLIP's text
    embedding; all `[.., dim]` with `dim` = the model's embedding width (512 for ViT-B-32, 768 for ViT-L-14).
    """

    def __init__(self, config: FeatureModelConfig, config_path=None) -> None:
        force_offline()
        import open_clip  # heavy (imports torchvision); only when an open_clip model is built

        if config.pretrained and config.pretrained.startswith(HF_HUB_PREFIX) and config.arch:
            raise FeatureModelError(f"feature model {config.name!r}: `arch: {config.arch}` with `pretrained: "
                                    f"{config.pretrained}`: the repository's {HF_CONFIG} names the architecture; "
                                    "remove `arch`")
        try:
            source = open_clip_source(config)
        except FeatureModelError as exc:  # the same class, naming the model
            raise type(exc)(f"feature model {config.name!r}: {exc}") from exc
        self.device = torch.device(config.device)
        if source is None:
            model = open_clip.create_model(config.arch, device=self.device)
            model_name = config.arch
        else:
            local = source.model_name.startswith("local-dir:")  # an hf-hub snapshot: its checkpoint is found there
            try:
                model = open_clip.create_model(
                    source.model_name, pretrained=None if local else str(source.checkpoint),
                    force_quick_gelu=source.quick_gelu, force_preprocess_cfg=source.preprocess, device=self.device,
                    weights_only=not source.published)
            except (RuntimeError, ValueError, KeyError, OSError) as exc:  # a file of another arch, damaged, pickled
                raise FeatureModelError(
                    f"feature model {config.name!r}: {source.checkpoint} cannot be loaded as open_clip "
                    f"{config.arch or config.pretrained}: {exc}\n(Published weights load as plain tensors from their "
                    "Hugging Face copy: `pretrained:` without `weights:`, whose fetch command a missing copy prints.)"
                ) from exc
            model_name = source.model_name
        self.model = model.eval()
        visual = model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise FeatureModelError(
                f"{config.arch or config.pretrained}: MaskCLIP dense features need an open_clip VisionTransformer "
                f"without attention pooling; got {type(visual).__name__}"
            )
        last = visual.transformer.resblocks[-1]
        if not isinstance(last.attn, nn.MultiheadAttention) or not visual.transformer.batch_first:
            raise FeatureModelError(f"{config.arch}: last block's attention is not a batch-first nn.MultiheadAttention")
        if visual.pool_type != "tok":
            raise FeatureModelError(f"{config.arch}: MaskCLIP needs class-token pooling; this model pools "
                                    f"{visual.pool_type!r}")
        cfg = open_clip.get_model_preprocess_cfg(model)
        self._mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self.name = config.name
        self.dim = int(visual.output_dim)
        self.patch_size = int(visual.patch_size[0])
        self.tile_size = int(visual.image_size[0])
        self.min_side = config.min_side
        self.output_stride = config.output_stride
        self.batch_size = config.batch_size
        if source is None:
            arch = config.arch
        elif source.model_name.startswith("local-dir:"):
            arch = config.pretrained
        else:  # QuickGELU changes the features of the same file: part of the identity
            arch = config.arch + ("-quickgelu" if source.quick_gelu and "quickgelu" not in config.arch else "")
        self.identity = self.make_identity(f"open_clip:{arch}", file_sha256(source.checkpoint) if source else None)

    def _normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        return (tiles - self._mean) / self._std

    def _trunk(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles: [N, 3, S, S']` in [0, 1] -> tokens entering the last block `[N, 1 + g*g', width]` (class first)."""
        visual = self.model.visual
        tokens = visual._embeds(self._normalize(tiles))
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        return tokens

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens: [.., width]` -> `[.., dim]` in the text space: `ln_post`, then the visual projection."""
        visual = self.model.visual
        tokens = visual.ln_post(tokens)
        return tokens if visual.proj is None else tokens @ visual.proj

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        tokens = self._trunk(tiles)
        last = self.model.visual.transformer.resblocks[-1]
        width = tokens.shape[-1]
        bias = last.attn.in_proj_bias
        values = F.linear(last.ln_1(tokens[:, 1:]), last.attn.in_proj_weight[2 * width :],
                          None if bias is None else bias[2 * width :])
        patches = self._head(last.ls_1(last.attn.out_proj(values)))  # [N, g*g', dim]
        grid_h, grid_w = (s // self.patch_size for s in tiles.shape[-2:])
        return patches.unflatten(1, (grid_h, grid_w))

    def _encode_global(self, tiles: torch.Tensor) -> torch.Tensor:
        """The class-token path of the same trunk and head: the whole last block, then the head on token 0
        (equals open_clip's `encode_image`, checked in test/test_open_clip_weights.py)."""
        last = self.model.visual.transformer.resblocks[-1]
        return self._head(last(self._trunk(tiles))[:, 0])

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
