"""Feature extractors: the open_clip/MaskCLIP code path (with weights the tests make), the shipped m3-tinyvlm on real
photographs and rendered scenes, region pooling, registry/config, the feature cache and the `features` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # loading must never touch a network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from m3_memory.core.features import (  # noqa: E402
    FeatureCache,
    FeatureModelConfig,
    FeatureModelError,
    WeightsMissingError,
    build_extractor,
    create_extractor,
    extract_scene,
    image_sha256,
    load_configs,
)
from m3_memory.cli import features as features_cli  # noqa: E402
from m3_memory.core.features.base import tile_offsets  # noqa: E402
from m3_memory.core.features.evaluate import composite_peaks, demo_object_peaks, photo_matching  # noqa: E402
from m3_memory.core.features.regions import pool_regions, superpixels  # noqa: E402
from m3_memory.core.scene import Scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST_ARCH = "m3-test-vit-tiny"  # a 2-layer ViT config registered with open_clip by the tests, random weights

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def test_arch(tmp_path_factory) -> str:
    """Register a tiny open_clip ViT architecture (64 px tiles, patch 16, width 64) under TEST_ARCH."""
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    config = {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (folder / f"{TEST_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TEST_ARCH


def _save_random_open_clip(arch: str, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(arch).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_weights(test_arch, tmp_path_factory) -> Path:
    return _save_random_open_clip(test_arch, tmp_path_factory.mktemp("w") / "random-test-vit.pt", seed=0)


def _clip_config(arch: str, weights: Path | None, **kw) -> FeatureModelConfig:
    return FeatureModelConfig(name="test-random-vit", kind="open_clip", arch=arch,
                              weights=str(weights) if weights else None, **kw)


@pytest.fixture(scope="module")
def clip(test_arch, clip_weights):
    return create_extractor(_clip_config(test_arch, clip_weights, output_stride=16))


@pytest.fixture(scope="module")
def tinyvlm():
    return build_extractor("m3-tinyvlm")


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Scene:
    pytest.importorskip("pybullet")
    from m3_memory.sim import demo_scene

    return Scene.load(demo_scene("tiny", out=tmp_path_factory.mktemp("scene") / "tiny"))


def _rng_images(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ open_clip / MaskCLIP


def test_open_clip_dense_shape_norm_and_text(clip):
    dense = clip.dense(_rng_images(2, 96, 128, 3))
    assert dense.shape == (2, 6, 8, 48) and dense.dtype == torch.float32
    assert torch.allclose(dense.norm(dim=-1), torch.ones(2, 6, 8), atol=1e-5)
    text = clip.encode_text(["a cat", "a rocket", "a cat"])
    assert text.shape == (3, 48)
    assert torch.allclose(text[0], text[2]) and not torch.allclose(text[0], text[1])


def test_tiles_side_by_side_match_separate_runs(clip):
    """Two non-overlapping 64 px tiles: each half of the canvas equals that half encoded alone."""
    image = _rng_images(1, 64, 128, 3)
    both = clip.dense(image)[0]
    left, right = clip.dense(image[:, :, :64])[0], clip.dense(image[:, :, 64:])[0]
    assert both.shape == (4, 8, 48)
    assert torch.allclose(both[:, :4], left, atol=1e-5) and torch.allclose(both[:, 4:], right, atol=1e-5)


def test_overlapping_tiles_average_only_where_they_overlap(clip):
    image = _rng_images(1, 64, 96, 3, seed=1)
    assert tile_offsets(96, 64, 16) == [0, 32]
    dense = clip.dense(image)[0]  # tokens of columns 2-3 come from both tiles
    left, right = clip.dense(image[:, :, :64])[0], clip.dense(image[:, :, 32:])[0]
    assert torch.allclose(dense[:, :2], left[:, :2], atol=1e-5)
    assert torch.allclose(dense[:, 4:], right[:, 2:], atol=1e-5)
    pixels = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():  # the canvas averages raw (unnormalised) tokens of both tiles
        raw = clip._encode_tiles(pixels[..., :64])[0, :, 2:] + clip._encode_tiles(pixels[..., 32:])[0, :, :2]
    assert torch.allclose(dense[:, 2:4], torch.nn.functional.normalize(raw, dim=-1), atol=1e-5)


def test_maskclip_tokens_equal_last_block_attention_restricted_to_self(clip):
    """MaskCLIP's value path == PyTorch's own MultiheadAttention when every token may only attend to itself."""
    tiles = torch.rand(2, 3, 64, 64)
    visual = clip.model.visual
    with torch.no_grad():
        tokens = visual._embeds(clip._normalize(tiles))
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        last = visual.transformer.resblocks[-1]
        n = tokens.shape[1]
        self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        y = last.ln_1(tokens)
        attended, _ = last.attn(y, y, y, attn_mask=self_only, need_weights=False)
        expected = (visual.ln_post(attended[:, 1:]) @ visual.proj).unflatten(1, (4, 4))
        got = clip._encode_tiles(tiles)
    assert got.shape == (2, 4, 4, 48)
    assert torch.allclose(got, expected, atol=1e-5)
    # ... and it is not the ordinary output tokens (the q.k mixing really is skipped)
    full = visual.ln_post(last(tokens)[:, 1:]) @ visual.proj
    assert not torch.allclose(got.flatten(1, 2), full, atol=1e-3)


def test_encode_image_is_open_clips_pooled_embedding(clip):
    image = _rng_images(1, 64, 64, 3, seed=2)
    pixels = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.model.encode_image(clip._normalize(pixels)), dim=-1)
    assert torch.allclose(clip.encode_image(image), expected, atol=1e-5)


def test_identity_follows_weights_file(test_arch, clip, clip_weights, tmp_path):
    same = create_extractor(_clip_config(test_arch, clip_weights, output_stride=16))
    assert same.identity == clip.identity and not clip.identity.random_init
    other_weights = _save_random_open_clip(test_arch, tmp_path / "b.pt", seed=1)
    other = create_extractor(_clip_config(test_arch, other_weights, output_stride=16))
    assert other.identity.key != clip.identity.key and other.identity.arch == clip.identity.arch
    coarser = create_extractor(_clip_config(test_arch, clip_weights, output_stride=32))  # other features, same weights
    assert coarser.identity.weights_sha256 == clip.identity.weights_sha256 and coarser.identity.key != clip.identity.key


def test_safetensors_checkpoint_loads_the_same_model(test_arch, clip, tmp_path):
    """Downloaded open_clip weights usually come as .safetensors: same tensors, same features, same identity rules."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    loaded = create_extractor(_clip_config(test_arch, path, output_stride=16))
    image = _rng_images(1, 64, 64, 3, seed=4)
    assert torch.allclose(loaded.dense(image), clip.dense(image), atol=1e-6)
    assert not loaded.identity.random_init and loaded.identity.weights_sha256 != clip.identity.weights_sha256


def test_missing_weights_say_where_and_how(test_arch, tmp_path):
    missing = tmp_path / "ViT-B-32-openai.pt"
    with pytest.raises(WeightsMissingError) as info:
        create_extractor(_clip_config(test_arch, missing))
    assert str(missing) in str(info.value) and f"list_pretrained_tags_by_model('{test_arch}')" in str(info.value)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        random = create_extractor(_clip_config(test_arch, missing, allow_random_init=True))
    assert random.identity.random_init and "RANDOM-INIT" in random.identity.key
    assert "RANDOM WEIGHTS" in random.describe()


def test_dinov2_kind_loads_a_timm_state_dict_offline_at_another_tile_size(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # 518 px position grid as released; 2 blocks instead of 12 keep the test fast
    released = timm.create_model("vit_small_patch14_dinov2", num_classes=0, depth=2)
    torch.save(released.state_dict(), tmp_path / "dinov2.pth")
    config = FeatureModelConfig(name="dinov2-test", kind="timm_vit", arch="vit_small_patch14_dinov2",
                                weights=str(tmp_path / "dinov2.pth"), tile_size=56, output_stride=14,
                                options={"depth": 2})
    dinov2 = create_extractor(config)
    assert (dinov2.patch_size, dinov2.tile_size, dinov2.dim) == (14, 56, 384) and not dinov2.identity.random_init
    assert torch.equal(dinov2.model.blocks[0].attn.qkv.weight, released.blocks[0].attn.qkv.weight)
    image = _rng_images(1, 56, 112, 3, seed=5)
    dense = dinov2.dense(image)
    assert dense.shape == (1, 4, 8, 384)
    with torch.no_grad():  # left tile's tokens = timm's own patch tokens of that tile
        pixels = (torch.from_numpy(image[:, :, :56]).permute(0, 3, 1, 2).float() / 255 - dinov2._mean) / dinov2._std
        tokens = dinov2.model.forward_features(pixels)[:, 1:].reshape(1, 4, 4, 384)
    assert torch.allclose(dense[:, :, :4], torch.nn.functional.normalize(tokens, dim=-1), atol=1e-5)
    with pytest.raises(FeatureModelError, match="no text side"):
        dinov2.encode_text(["a cat"])


# ------------------------------------------------------------------------------------- m3-tinyvlm (real ranking)


def test_tinyvlm_matches_phrases_to_real_photos(tinyvlm):
    result = photo_matching(tinyvlm)
    assert result["accuracy"] == 1.0, result


def test_tinyvlm_dense_peaks_land_in_the_right_photo_of_a_composite(tinyvlm):
    result = composite_peaks(tinyvlm)
    assert result["accuracy"] == 1.0, result
    assert min(result["margin"]) > 0, result


def test_tinyvlm_finds_objects_in_an_unseen_scene_layout(tinyvlm, tiny_scene):
    """The tiny scene (other layout, other size, other camera arc) was never trained on."""
    result = demo_object_peaks(tinyvlm, tiny_scene, list(range(len(tiny_scene))), min_pixels=100)
    assert result["trials"] >= 6
    assert result["accuracy"] >= 0.7, result


def test_tinyvlm_identity_is_honest(tinyvlm):
    identity = tinyvlm.identity
    assert identity.name == "m3-tinyvlm" and "clip" not in identity.arch.lower() and not identity.random_init
    assert tinyvlm.dense(_rng_images(1, 120, 160, 3)).shape == (1, 30, 40, tinyvlm.dim)


def test_training_script_learns_and_writes_loadable_weights(tiny_scene, tmp_path, monkeypatch):
    """scripts/train_tiny_vlm.py on the tiny scene for a few steps: the loss on its own samples drops, the file loads."""
    import importlib.util

    from m3_memory.core.features.tinyvlm import MiniLmText, save_weights

    spec = importlib.util.spec_from_file_location("train_tiny_vlm", REPO / "scripts" / "train_tiny_vlm.py")
    trainer = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, trainer)  # dataclasses look their module up there
    spec.loader.exec_module(trainer)
    data = trainer.build_data(tiny_scene)
    assert "cat" in data.concepts and "yellow bath duck" in data.concepts and len(data.views) == len(tiny_scene) - 2
    sentence = MiniLmText(torch.device("cpu"))(data.phrases)
    config = trainer.TrainConfig(steps=8, batch=8, pool=32)
    images, labels = trainer.sample_pool(data, config.pool, np.random.default_rng(config.seed))  # the pool train() draws

    def loss(model):
        with torch.no_grad():
            tokens = model.patch_tokens(images).flatten(0, 2)
            return float(trainer.contrastive_loss(tokens, labels.flatten(), model.text_tokens(sentence),
                                                  data.phrase_concept, 10.0, 1.0))

    torch.manual_seed(config.seed)
    before = loss(trainer.TinyVlm(trainer.TinyVlmConfig()))  # train() starts from this same seeded init
    model = trainer.train(data, sentence, config, log=lambda _: None)
    after = loss(model)
    assert after < before - 0.1, (before, after)
    save_weights(model, tmp_path / "w.pt", {"training": {"steps": config.steps}})
    extractor = build_extractor("m3-tinyvlm", weights=str(tmp_path / "w.pt"))
    assert extractor.dense(_rng_images(1, 48, 64, 3)).shape == (1, 12, 16, extractor.dim)


# ----------------------------------------------------------------------------------------- regions + registry


def test_pool_regions_duplicates_one_unit_embedding_per_region():
    features = torch.randn(4, 6, 8)
    labels = torch.zeros(4, 6, dtype=torch.long)
    labels[:, 3:] = 1
    pooled = pool_regions(features, labels)
    expected = torch.nn.functional.normalize(features[:, :3].reshape(-1, 8).sum(0), dim=0)
    assert torch.allclose(pooled[2, 1], expected, atol=1e-6)
    assert torch.allclose(pooled[:, :3], expected.expand(4, 3, 8), atol=1e-6)


def test_region_model_is_piecewise_constant_over_superpixels(tinyvlm):
    regions = build_extractor("m3-tinyvlm-regions")
    from m3_memory.core.features.evaluate import load_photo

    image = load_photo("coffee", 128)[None]
    dense, base = regions.dense(image)[0], tinyvlm.dense(image)[0]
    assert dense.shape == base.shape
    labels = superpixels(image[0], dense.shape[:2], regions.n_segments, regions.compactness)
    assert 10 <= labels.max() + 1 <= 200
    for region in np.unique(labels):
        inside = dense[torch.from_numpy(labels == region)]
        assert torch.allclose(inside, inside[:1].expand_as(inside))
    assert float((dense * base).sum(-1).mean()) > 0.5  # region means stay close to the pixels they replace
    assert regions.identity.key != tinyvlm.identity.key and "slic" in regions.identity.arch
    assert regions.encode_text(["a cup of coffee"]).shape == (1, tinyvlm.dim)


def test_repo_config_lists_models_and_defaults_to_the_offline_model():
    default, configs = load_configs()
    assert default == "m3-tinyvlm"
    assert {"clip", "clip-l14", "m3-tinyvlm", "m3-tinyvlm-regions"} <= set(configs)
    assert configs["clip"].kind == "open_clip" and configs["clip"].arch == "ViT-B-32"


def test_config_errors_are_explained(tmp_path):
    bad = tmp_path / "features.yaml"
    bad.write_text("default: x\nmodels:\n  x: {kind: open_clip, wieghts: a.pt}\n")
    with pytest.raises(FeatureModelError, match="unknown keys"):
        load_configs(bad)
    bad.write_text("default: x\nmodels:\n  x: {kind: no-such-kind}\n")
    with pytest.raises(FeatureModelError, match="unknown kind"):
        build_extractor("x", bad)
    with pytest.raises(WeightsMissingError, match="hf download timm/vit_base_patch32_clip_224.openai"):
        build_extractor("clip", weights=str(tmp_path / "absent.pt"))


# ------------------------------------------------------------------------------------------------------ cache


def _count_dense(monkeypatch, extractor) -> list[int]:
    """Record the batch size of every `dense` call the extractor makes (undone when the test ends)."""
    calls: list[int] = []
    original = extractor.dense
    monkeypatch.setattr(extractor, "dense", lambda images: calls.append(len(images)) or original(images))
    return calls


def test_cache_writes_once_as_float16_memmaps(tinyvlm, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, tinyvlm)
    calls = _count_dense(monkeypatch, tinyvlm)
    images = _rng_images(3, 64, 80, 3)
    first = cache.get_many(images)
    again = cache.get_many(images[::-1])
    assert calls == [3]
    assert all(isinstance(a, np.memmap) and a.dtype == np.float16 and not a.flags.writeable for a in first)
    assert np.array_equal(again[0], first[2])
    expected = tinyvlm.dense(images[:1])[0].numpy()
    assert calls == [3, 1]
    assert np.allclose(first[0].astype(np.float32), expected, atol=2e-3)
    assert (cache.dir.name == tinyvlm.identity.key) and len(list(cache.dir.glob("*.npy"))) == 3


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_sidecar", "other_model"])
def test_corrupt_entries_are_detected_and_recomputed(tinyvlm, tmp_path, damage):
    image = _rng_images(40, 56, 3, seed=3)
    good = np.array(FeatureCache(tmp_path, tinyvlm).get(image))
    data = tmp_path / tinyvlm.identity.key / f"{image_sha256(image)}.npy"
    meta = data.with_suffix(".json")
    if damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[-7] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "drop_sidecar":
        meta.unlink()
    else:
        entry = json.loads(meta.read_text())
        entry["identity"]["weights_sha256"] = "0" * 64
        meta.write_text(json.dumps(entry))
    cache = FeatureCache(tmp_path, tinyvlm)
    assert not cache.contains(image_sha256(image))
    assert np.array_equal(np.array(cache.get(image)), good)
    assert cache.contains(image_sha256(image))


def test_killed_extraction_resumes_keeping_finished_views(tinyvlm, tiny_scene, tmp_path, monkeypatch):
    config = tmp_path / "features.yaml"
    weights = REPO / "m3_memory/core/features/weights/m3-tinyvlm.pt"
    config.write_text(f"default: m3-tinyvlm\nmodels:\n  m3-tinyvlm:\n    kind: tinyvlm\n    weights: {weights}\n"
                      "    tile_size: null\n    min_side: 240\n    batch_size: 1\n")
    cache_root = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-m", "m3_memory.cli.features", str(tiny_scene.root), "--config", str(config),
         "--cache-dir", str(cache_root), "--no-progress"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    entries = cache_root / tinyvlm.identity.key
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None and not list(entries.glob("*.json")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as a crash would: no clean-up runs
    process.wait()
    done = len(list(entries.glob("*.json")))
    assert done >= 1, process.stdout.read().decode()
    cache = FeatureCache(cache_root, tinyvlm)
    calls = _count_dense(monkeypatch, tinyvlm)
    features = extract_scene(tiny_scene, tinyvlm, cache, batch=1)
    assert sum(calls) == len(tiny_scene) - done and len(features) == len(tiny_scene)
    assert not list(entries.glob(".*.tmp"))
    assert np.allclose(features[0].astype(np.float32), tinyvlm.dense(tiny_scene.image(0)[None])[0].numpy(), atol=2e-3)


def test_interrupted_extraction_resumes_with_the_missing_views_only(tinyvlm, tiny_scene, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path, tinyvlm)
    original = tinyvlm.dense

    def interrupt_after_two_views(images):
        if len(list(cache.dir.glob("*.json"))) >= 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a scene
        return original(images)

    monkeypatch.setattr(tinyvlm, "dense", interrupt_after_two_views)
    with pytest.raises(KeyboardInterrupt):
        extract_scene(tiny_scene, tinyvlm, cache, batch=1)
    monkeypatch.undo()
    calls = _count_dense(monkeypatch, tinyvlm)
    resumed = FeatureCache(tmp_path, tinyvlm)
    features = extract_scene(tiny_scene, tinyvlm, resumed, batch=2)
    assert sum(calls) == len(tiny_scene) - 2 and len(features) == len(tiny_scene) and resumed.recomputed == 0


def test_features_command_fills_the_scene_cache(tinyvlm, tiny_scene, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="m3")
    features_cli.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["features", str(tiny_scene.root), "--model", "m3-tinyvlm", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert f"{len(tiny_scene)} views" in out.out and "features m3-tinyvlm" in out.err  # summary + tqdm bar
    assert len(list((tmp_path / tinyvlm.identity.key).glob("*.npy"))) == len(tiny_scene)
    args = parser.parse_args(["features", str(tiny_scene.root), "--model", "clip", "--cache-dir", str(tmp_path)])
    from m3_memory.core.features.open_clip_model import open_clip_source

    try:
        open_clip_source(load_configs()[1]["clip"])  # a developer may have real CLIP weights cached
    except WeightsMissingError:
        assert args.func(args) == 1
        assert "hf download timm/vit_base_patch32_clip_224.openai" in capsys.readouterr().err
