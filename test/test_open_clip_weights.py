"""Published open_clip weights the ways users keep them: `pretrained:` tags and `hf-hub:` repos read offline from
caches laid out exactly as huggingface_hub and open_clip write them (weights made here: random-init models), the
fetch message when they are absent (also through `m3 features`), and the parity of our class-token path (the trunk and
head MaskCLIP's dense features use) with open_clip's own `encode_image` for ViT-B-32 and ViT-L-14."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # loading must never touch a network

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from conftest import VENV_BIN  # noqa: E402
from m3_memory.cli import features as features_cli  # noqa: E402
from m3_memory.core.features import FeatureModelConfig, FeatureModelError, WeightsMissingError  # noqa: E402
from m3_memory.core.features import create_extractor  # noqa: E402
from m3_memory.core.features.open_clip_model import locate_pretrained, open_clip_source  # noqa: E402

torch.set_num_threads(2)

TAG_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip 3.3 gets ViT-B-32 'openai' (its hf_hub entry)
TINY_REPO = "m3-test/random-tiny-vit"  # an hf-hub repo made by these tests
TINY_CONFIG = {  # open_clip_config.json of a 2-layer ViT, 64 px tiles (random weights)
    "model_cfg": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


# --------------------------------------------------------------------------------------------- cache layouts


def put_in_hf_cache(root: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> Path:
    """Lay `files` ({name: file}) out as huggingface_hub's download does: blobs named by etag (sha256 for LFS files
    such as weights, the git blob sha1 for small ones), snapshots/COMMIT/NAME linked to them, refs/main = COMMIT."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        lfs = not name.endswith(".json")
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        shutil.move(source, repo / "blobs" / etag)
        (repo / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def assert_valid_hf_cache(root: Path, repo_id: str, names: set[str]) -> None:
    """huggingface_hub's own cache scanner reads the layout as one clean repo holding `names` (no warnings)."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(root)
    assert not info.warnings, info.warnings
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    (revision,) = repo.revisions
    assert "main" in revision.refs and {f.file_name for f in revision.files} == names


def save_weights(state: dict[str, torch.Tensor], path: Path, dtype=None) -> Path:
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _config(**fields) -> FeatureModelConfig:
    return FeatureModelConfig(name="test-random-vit", kind="open_clip", device="cpu", **fields)


def _assert_loaded(model: torch.nn.Module, written: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(written) <= set(loaded)
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key


# ------------------------------------------------------------------------------------------------- hf-hub repos


@pytest.fixture(scope="module")
def tiny_written(tmp_path_factory):
    """A random-init tiny open_clip model's state dict, saved as an hf-hub repo (config + .safetensors) in a cache."""
    torch.manual_seed(0)
    state = open_clip.CLIP(**TINY_CONFIG["model_cfg"]).state_dict()
    root, staging = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("staging")
    (staging / "open_clip_config.json").write_text(json.dumps(TINY_CONFIG))
    files = {"open_clip_config.json": staging / "open_clip_config.json",
             "open_clip_model.safetensors": save_weights(state, staging / "open_clip_model.safetensors")}
    put_in_hf_cache(root, TINY_REPO, files)
    return root, state


def test_hf_hub_repo_loads_offline_from_the_cache_with_its_config(tiny_written):
    root, state = tiny_written
    assert_valid_hf_cache(root, TINY_REPO, {"open_clip_config.json", "open_clip_model.safetensors"})
    extractor = create_extractor(_config(pretrained=f"hf-hub:{TINY_REPO}", cache_dir=str(root), output_stride=16))
    _assert_loaded(extractor.model, state)
    assert extractor.dim == 48 and extractor.tile_size == 64  # the architecture came from open_clip_config.json
    assert torch.allclose(extractor._std.flatten(), torch.tensor([0.25] * 3))  # ... and its preprocessing
    snapshot = root / f"models--{TINY_REPO.replace('/', '--')}" / "snapshots" / ("a" * 40)
    blob = (snapshot / "open_clip_model.safetensors").resolve()
    assert extractor.identity.weights_sha256 == blob.name  # the weights' etag is their sha256
    assert extractor.identity.arch == f"open_clip:hf-hub:{TINY_REPO}"
    dense = extractor.dense(np.zeros((1, 64, 96, 3), np.uint8))
    assert dense.shape == (1, 4, 6, 48) and extractor.encode_text(["a mug"]).shape == (1, 48)


def test_hf_hub_repo_with_only_a_bin_file_and_a_newer_revision(tiny_written, tmp_path):
    """Older repos hold open_clip_pytorch_model.bin; refs/main picks the revision (the older one is ignored)."""
    _, state = tiny_written
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.manual_seed(1)
    newer = open_clip.CLIP(**TINY_CONFIG["model_cfg"]).state_dict()
    for commit, weights in (("b" * 40, state), ("c" * 40, newer)):
        (staging / "open_clip_config.json").write_text(json.dumps(TINY_CONFIG))
        put_in_hf_cache(tmp_path / "hf", TINY_REPO, {
            "open_clip_config.json": staging / "open_clip_config.json",
            "open_clip_pytorch_model.bin": save_weights(weights, staging / "w.bin")}, commit=commit)
    source = locate_pretrained("", f"hf-hub:{TINY_REPO}", tmp_path / "hf")
    assert source.checkpoint.name == "open_clip_pytorch_model.bin" and source.checkpoint.parent.name == "c" * 40
    _assert_loaded(create_extractor(_config(pretrained=f"hf-hub:{TINY_REPO}", cache_dir=str(tmp_path / "hf"))).model,
                   newer)


def test_hf_hub_repo_missing_says_what_to_fetch_and_where(tmp_path):
    with pytest.raises(WeightsMissingError) as info:
        create_extractor(_config(pretrained=f"hf-hub:{TINY_REPO}", cache_dir=str(tmp_path)))
    message = str(info.value)
    fetch = f"hf download {TINY_REPO} open_clip_config.json open_clip_model.safetensors --cache-dir {tmp_path}"
    assert fetch in message
    assert str(tmp_path / "models--m3-test--random-tiny-vit") in message and "test-random-vit" in message
    with pytest.raises(FeatureModelError, match="remove `arch`"):
        create_extractor(_config(arch="ViT-B-32", pretrained=f"hf-hub:{TINY_REPO}", cache_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------ pretrained tags (ViT-B-32)


@pytest.fixture(scope="module")
def b32_state():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").state_dict()


@pytest.fixture(scope="module")
def b32(b32_state, tmp_path_factory):
    """ViT-B-32 built from `pretrained: openai`, its file (random weights, float16 like OpenAI's) in an HF cache."""
    root, staging = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("staging")
    weights = save_weights(b32_state, staging / "w.safetensors", dtype=torch.float16)
    put_in_hf_cache(root, TAG_REPO, {"open_clip_model.safetensors": weights})
    assert_valid_hf_cache(root, TAG_REPO, {"open_clip_model.safetensors"})
    return create_extractor(_config(arch="ViT-B-32", pretrained="openai", cache_dir=str(root)))


def test_pretrained_tag_loads_its_hf_cache_file_with_the_tags_settings(b32, b32_state):
    _assert_loaded(b32.model, {k: v.half() if v.is_floating_point() else v for k, v in b32_state.items()})
    gelu = b32.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(gelu, open_clip.transformer.QuickGELU)  # OpenAI's weights were trained with QuickGELU
    assert b32.identity.arch == "open_clip:ViT-B-32-quickgelu" and not b32.identity.random_init


def test_pretrained_tag_falls_back_to_open_clips_url_download_folder(tmp_path, monkeypatch):
    """Without the HF copy, the url file where open_clip (no huggingface_hub) and OpenAI's clip package put it:
    `cache_dir` or ~/.cache/clip, checked against the sha256 published in OpenAI's URL."""
    monkeypatch.setenv("HOME", str(tmp_path))
    url_dir = tmp_path / ".cache" / "clip"
    url_dir.mkdir(parents=True)
    (url_dir / "b32_400m.pt").write_bytes(b"metaclip weights")  # a url without a published sha256
    empty_hf = tmp_path / "no-hf"
    assert locate_pretrained("ViT-B-32", "metaclip_400m", None).checkpoint == url_dir / "b32_400m.pt"
    (url_dir / "ViT-B-32.pt").write_bytes(b"not OpenAI's file")
    with pytest.raises(WeightsMissingError, match="sha256 differs from 40d36571"):
        locate_pretrained("ViT-B-32", "openai", None)
    empty_hf.mkdir()
    (empty_hf / "b32_400m.pt").write_bytes(b"elsewhere")  # `cache_dir` replaces both folders, as in open_clip
    assert locate_pretrained("ViT-B-32", "metaclip_400m", empty_hf).checkpoint == empty_hf / "b32_400m.pt"


def test_hf_copy_wins_over_the_url_file(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "w").write_bytes(b"bin weights")
    put_in_hf_cache(tmp_path, "timm/vit_base_patch32_clip_224.metaclip_400m",
                    {"open_clip_pytorch_model.bin": staging / "w"})
    (tmp_path / "b32_400m.pt").write_bytes(b"url weights")
    found = locate_pretrained("ViT-B-32", "metaclip_400m", tmp_path).checkpoint
    assert found.name == "open_clip_pytorch_model.bin" and found.read_bytes() == b"bin weights"


def test_missing_tag_weights_name_the_fetch_command_and_both_places(tmp_path):
    with pytest.raises(WeightsMissingError) as info:
        create_extractor(_config(arch="ViT-L-14", pretrained="openai", cache_dir=str(tmp_path)))
    message = str(info.value)
    assert ("hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors "
            f"--cache-dir {tmp_path}") in message
    assert str(tmp_path / "models--timm--vit_large_patch14_clip_224.openai") in message
    assert str(tmp_path / "ViT-L-14.pt") in message and "nothing is downloaded at run time" in message
    with pytest.raises(FeatureModelError, match="its tags: .*laion2b_s34b_b79k"):
        create_extractor(_config(arch="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(WeightsMissingError, match=f"hf download {TAG_REPO} open_clip_model.safetensors --local-dir"):
        create_extractor(_config(arch="ViT-B-32", pretrained="openai", weights=str(tmp_path / "mine.safetensors")))


def test_a_local_file_of_a_tag_takes_the_tags_settings(tmp_path):
    """`weights:` + `pretrained:` = this file holds that tag's weights: the tag's QuickGELU and mean/std apply (the
    b32 fixture shows create_model honouring them); without the tag, the architecture's own settings."""
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(b"weights")
    tagged = open_clip_source(_config(arch="ViT-B-32", pretrained="openai", weights=str(path)))
    plain = open_clip_source(_config(arch="ViT-B-32", weights=str(path)))
    assert tagged.checkpoint == plain.checkpoint == path and tagged.model_name == plain.model_name == "ViT-B-32"
    assert tagged.quick_gelu and not plain.quick_gelu and tagged.preprocess["mean"][0] == pytest.approx(0.4815, 1e-3)


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript archive")
def test_a_file_open_clip_cannot_read_is_explained(tmp_path):
    """A TorchScript archive (what OpenAI's .pt files are) whose sha256 is not the published one is not executed."""
    (tmp_path / "m3-test-tiny-arch.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path)
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, but OpenAI's files are such archives
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(FeatureModelError, match="cannot be loaded as open_clip m3-test-tiny-arch.*TorchScript"):
        create_extractor(_config(arch="m3-test-tiny-arch", weights=str(tmp_path / "scripted.pt")))


# ----------------------------------------------------------------------------------------------- device, CLI


def test_device_auto_is_the_default_and_a_missing_gpu_is_explained(tiny_written):
    root, _ = tiny_written
    assert FeatureModelConfig(name="x", kind="open_clip").device == "auto"
    auto = create_extractor(FeatureModelConfig(name="x", kind="open_clip", pretrained=f"hf-hub:{TINY_REPO}",
                                               cache_dir=str(root)))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FeatureModelError, match="needs CUDA"):
            create_extractor(FeatureModelConfig(name="x", kind="open_clip", pretrained=f"hf-hub:{TINY_REPO}",
                                                cache_dir=str(root), device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_features_on_cuda_match_cpu(tiny_written):
    root, _ = tiny_written
    config = dict(name="x", kind="open_clip", pretrained=f"hf-hub:{TINY_REPO}", cache_dir=str(root), output_stride=16)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 128, 3), dtype=np.uint8)
    gpu = create_extractor(FeatureModelConfig(**config, device="cuda"))
    cpu = create_extractor(FeatureModelConfig(**config, device="cpu"))
    on_gpu = gpu.dense(images)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), cpu.dense(images), atol=1e-3)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    pytest.importorskip("pybullet")
    from m3_memory.sim import demo_scene

    target = tmp_path_factory.mktemp("scene") / "tiny"
    shutil.copytree(demo_scene("tiny"), target, ignore=shutil.ignore_patterns("bag", "previews", "features"))
    return target


def _m3_features(scene: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([str(VENV_BIN / "m3"), "features", str(scene), "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_m3_features_without_the_weights_prints_the_fetch_command(scene_dir, tmp_path):
    result = _m3_features(scene_dir, tmp_path, "--model", "clip")
    assert result.returncode == 1, result.stderr
    hub = tmp_path / "hf" / "hub"  # the default cache follows HF_HOME, as huggingface_hub's does
    assert f"hf download {TAG_REPO} open_clip_model.safetensors --cache-dir {hub}" in result.stderr
    assert str(hub / "models--timm--vit_base_patch32_clip_224.openai") in result.stderr
    assert str(tmp_path / ".cache" / "clip" / "ViT-B-32.pt") in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("m3 features: ")


def test_m3_features_extracts_with_a_cached_hf_hub_model(scene_dir, tiny_written, tmp_path, capsys):
    """`pretrained:` + a `cache_dir` relative to the features YAML, through the `features` verb."""
    root, _ = tiny_written
    shutil.copytree(root, tmp_path / "weights-cache", symlinks=True)
    config = tmp_path / "features.yaml"
    config.write_text(f"default: tiny\nmodels:\n  tiny: {{kind: open_clip, pretrained: 'hf-hub:{TINY_REPO}', "
                      "cache_dir: weights-cache, output_stride: 16}\n")
    parser = argparse.ArgumentParser(prog="m3")
    features_cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["features", str(scene_dir), "--config", str(config), "--cache-dir",
                              str(tmp_path / "features"), "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0, capsys.readouterr().err
    assert f"open_clip_hf-hub_{TINY_REPO.replace('/', '_')}" in capsys.readouterr().out  # the identity key
    assert len(list((tmp_path / "features").glob("*/*.npy"))) > 0


# ------------------------------------------------------------------------------------- class-token path parity


def _parity(extractor) -> np.ndarray:
    """Our class-token path (MaskCLIP's trunk and head, the whole last block on token 0) == open_clip's encode_image
    -> the test image."""
    size = extractor.tile_size
    image = np.random.default_rng(3).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        expected = extractor.model.encode_image(extractor._normalize(pixels))
        ours = extractor._encode_global(pixels)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (1, extractor.dim)
    assert float((ours - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
    return image, expected


def test_class_token_path_reproduces_encode_image_vit_b_32(b32):
    image, expected = _parity(b32)
    public = b32.encode_image(image)  # uint8 in, resized to the tile size (the identity here), unit norm out
    assert torch.allclose(public, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


def test_class_token_path_reproduces_encode_image_vit_l_14():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        torch.manual_seed(0)
        extractor = create_extractor(_config(arch="ViT-L-14", allow_random_init=True))
    assert extractor.dim == 768 and extractor.patch_size == 14 and extractor.tile_size == 224
    _parity(extractor)
