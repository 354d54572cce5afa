"""Memory files that cannot run code and memories that load only when complete (issue #17)."""
import json
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from m3_memory.core.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_memory, memory_format, save_memory
from m3_memory.core.memory import PSCConfig
from m3_memory.core.scene import Scene
from m3_memory.core.trainer import TrainConfig, ViewFeatures, train
from m3_memory.core.views import TrainingViews
from m3_memory.sim import demo_scene

PSC = {"random": PSCConfig(threshold=0.85)}   # θ of a model features.yaml does not know


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A memory of the tiny scene after a few iterations, with densification statistics in its training state."""
    root = demo_scene("tiny")
    scene = Scene.load(root)
    rng = np.random.default_rng(0)   # stand-in features [30, 40, 8] per view: the format does not care what they mean
    features = ViewFeatures({"name": "random", "sha256": "test"},
                            [rng.standard_normal((30, 40, 8)).astype(np.float16) for _ in range(len(scene))])
    config = TrainConfig(iterations=4, log_every=2, init_max_points=1500, feature_samples=200, psc_pixel_stride=4,
                         psc=PSC)
    path = tmp_path_factory.mktemp("memory") / "tiny.pt"
    memory = train(scene, {"random": features}, config, path)
    return memory, path, scene, features


def header_and_tensors(path):
    """The safetensors metadata and tensors of a memory file, read as a third-party tool would."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])["__metadata__"], load_safetensors(data)


def rewrite(path, out, edit):
    """Copy of the memory at `path` with its JSON payload changed by `edit(payload, tensors)`."""
    metadata, tensors = header_and_tensors(path)
    payload = json.loads(metadata["payload"])
    edit(payload, tensors)
    out.write_bytes(save_safetensors(tensors, metadata={**metadata, "payload": json.dumps(payload)}))
    return out


def assert_same(a, b, where="state"):
    """Deep equality of nested training state: tensors bit for bit (and dtype), numbers and containers exactly."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_trained_memory_round_trips_exactly_as_safetensors(trained, tmp_path):
    memory, path, scene, features = trained
    assert memory_format(path) == CHECKPOINT_FORMAT
    metadata, tensors = header_and_tensors(path)           # a plain safetensors file: tensors + JSON, no pickle
    assert metadata["format"] == CHECKPOINT_FORMAT and "m.gaussians.means" in tensors
    loaded, state = load_memory(path)
    for name, value in memory.gaussians.params.items():
        assert torch.equal(loaded.gaussians.params[name], value.detach()), name
    for key, value in memory.attentions["random"].state_dict().items():
        assert torch.equal(loaded.attentions["random"].state_dict()[key], value), key
    assert loaded.gaussians.query_dims == memory.gaussians.query_dims and loaded.iteration == 4
    assert loaded.identities == memory.identities and loaded.world_frame == memory.world_frame
    assert loaded.config == memory.config and loaded.config["final"]["loss"] > 0
    for key in ("c2w", "K"):
        assert getattr(loaded.views, key).dtype == np.float64
        assert np.array_equal(getattr(loaded.views, key), getattr(memory.views, key))
    assert (loaded.views.width, loaded.views.height) == (memory.views.width, memory.views.height)

    # the training state as `train` wrote it: optimizer states (int-keyed, tuples), densification tensors, rng
    again = tmp_path / "again.pt"
    save_memory(again, loaded, state)
    _, state_again = load_memory(again)
    assert_same(state_again, state)
    assert state["strategy"]["grad2d"].shape == (len(memory.gaussians),)
    assert isinstance(state["optimizers"]["means"]["param_groups"][0]["betas"], tuple)
    assert isinstance(state["rng"]["state"]["state"], int) and state["rng"]["state"]["state"] > 2 ** 64
    (meta_a, tensors_a), (meta_b, tensors_b) = header_and_tensors(again), header_and_tensors(path)
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()     # saving a loaded memory changes nothing
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)

    resumed = train(scene, {"random": features}, TrainConfig(iterations=6, log_every=2, init_max_points=1500, psc=PSC,
                                                               feature_samples=200), tmp_path / "resumed.pt",
                    resume=path)
    assert resumed.iteration == 6
    with pytest.raises(Exception, match="already trained for 4 iterations"):
        train(scene, {"random": features}, TrainConfig(iterations=4, psc=PSC), tmp_path / "no.pt", resume=path)
    assert not (tmp_path / "no.pt").exists()


class WritesAFile:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_payload_executes_nothing_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "crafted.pt"
    torch.save({"format": "m3-memory/1", "gaussians": WritesAFile(marker)}, zipped)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": "m3-memory/1", "x": WritesAFile(marker)}, protocol=2))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match="can run any code.*trusted=True"):
            load_memory(path)
        assert not marker.exists()
    assert memory_format(zipped) == "m3-memory/1" and not marker.exists()   # sniffing reads opcodes only

    with pytest.warns(UserWarning, match="trusted torch pickle"), pytest.raises(CheckpointError, match="not a complete memory"):
        load_memory(zipped, trusted=True)
    assert marker.exists()   # the payload is real: the explicit switch is what lets it run


def test_old_pickles_load_only_when_trusted(trained, tmp_path):
    memory, path, _, _ = trained
    loaded, state = load_memory(path)
    payload = {"format": "m3-memory/1", "gaussians": {k: v.detach() for k, v in loaded.gaussians.params.items()},
               "query_dims": loaded.gaussians.query_dims, "sh_degree": loaded.gaussians.sh_degree,
               "attentions": {"random": {"state": loaded.attentions["random"].state_dict(),   # no kind: the oldest
                                          "temperature": 0.05, "learnable_wm": False}},
               "identities": loaded.identities, "world_frame": "world", "config": loaded.config, "iteration": 4,
               "views": {"c2w": loaded.views.c2w, "K": loaded.views.K, "width": loaded.views.width,
                         "height": loaded.views.height}, "training_state": state}
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_memory(old)
    with pytest.warns(UserWarning, match="could have run any code"):
        again, _ = load_memory(old, trusted=True)
    assert torch.equal(again.gaussians.params["queries"], loaded.gaussians.params["queries"])
    save_memory(tmp_path / "converted.pt", again)
    assert memory_format(tmp_path / "converted.pt") == CHECKPOINT_FORMAT


def test_incomplete_memories_are_refused_at_load_with_what_is_missing(trained, tmp_path):
    memory, path, _, _ = trained
    format_only = tmp_path / "format_only.pt"
    torch.save({"format": "m3-memory/1"}, format_only)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="has no gaussians, query_dims"):
        load_memory(format_only, trusted=True)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(save_safetensors({}, metadata={"format": CHECKPOINT_FORMAT, "payload": "{}"}))
    with pytest.raises(CheckpointError, match="has no gaussians, query_dims"):
        load_memory(empty)

    def no_views(payload, tensors):
        payload["views"] = {"c2w": [], "K": [], "width": 160, "height": 120}
    with pytest.raises(CheckpointError, match=r"views need c2w \[n, 4, 4\] with n >= 1.*K \[n, 3, 3\]"):
        load_memory(rewrite(path, tmp_path / "no_views.pt", no_views))

    def short_opacities(payload, tensors):
        tensors["m.gaussians.opacities"] = tensors["m.gaussians.opacities"][:-1].clone()
    with pytest.raises(CheckpointError, match="Gaussian opacities has shape"):
        load_memory(rewrite(path, tmp_path / "short.pt", short_opacities))

    def no_model(payload, tensors):
        payload["attentions"], payload["identities"] = {}, {}
    with pytest.raises(CheckpointError, match="no model"):
        load_memory(rewrite(path, tmp_path / "no_model.pt", no_model))

    def missing_tensor(payload, tensors):
        del tensors["m.gaussians.means"]
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*KeyError"):
        load_memory(rewrite(path, tmp_path / "missing_tensor.pt", missing_tensor))

    newer = tmp_path / "newer.pt"
    newer.write_bytes(save_safetensors({}, metadata={"format": "m3-memory/9", "payload": "{}"}))
    with pytest.raises(CheckpointError, match="has format 'm3-memory/9'.*retrain"):
        load_memory(newer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_memory(truncated)

    memory_views = memory.views
    memory.views = TrainingViews(np.zeros((0, 4, 4)), np.zeros((0, 3, 3)), 160, 120)
    try:
        with pytest.raises(CheckpointError, match="views need c2w"):
            save_memory(tmp_path / "never.pt", memory)                 # nothing incomplete is ever written
    finally:
        memory.views = memory_views
    assert not (tmp_path / "never.pt").exists() and not list(tmp_path.glob(".never.pt.*"))


def test_memory_format_tells_memories_from_other_files(trained, tmp_path):
    _, path, _, _ = trained
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")      # a torch file, but not a memory
    (tmp_path / "other.safetensors").write_bytes(save_safetensors({"w": torch.zeros(2)}))
    shutil.copy(path, tmp_path / "memory.bin")                          # the name does not matter, the bytes do
    assert memory_format(tmp_path / "memory.bin") == CHECKPOINT_FORMAT
    for name in ("notes.txt", "other.pt", "other.safetensors", "missing.pt", "."):
        assert memory_format(tmp_path / name) is None, name
