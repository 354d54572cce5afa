"""One file per memory: Gaussians, a decoder per model (M3: PSC bank + Wm; the distillation baseline: its MLP),
extractor identities, config, training cameras and (optionally) the training state for resuming; written atomically.

Format "m3-memory/2" is a safetensors file: every tensor and numpy array is a named safetensors tensor, everything else
is JSON in the header's `__metadata__` (`format`, `payload`: the structure with `{"$tensor": name}` where a tensor was).
Reading it parses bytes only, so a memory file cannot run code. The path is whatever the caller names (`.pt` by
habit); the format is told by the file's first bytes, not its name. The older "m3-memory/1" files are torch pickles,
which can run arbitrary code when loaded: they load only with `trusted=True`, and with a warning.

Every memory that loads is complete (`_check`): a later query cannot fail on its structure.
"""
from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from m3_memory.core.atomic import write_atomic
from m3_memory.core.errors import M3Error
from m3_memory.core.gaussians import QUERY_LAYOUTS, GaussianModel
from m3_memory.core.memory import Decoder, FeatureDecoder, MemoryAttention
from m3_memory.core.views import Camera, RenderedView, TrainingViews, render_memory

CHECKPOINT_FORMAT = "m3-memory/2"
PICKLE_FORMAT = "m3-memory/1"   # torch.save pickles of the same payload
# Trailing shape of each Gaussian tensor after N (-1: checked against query_dims / sh_degree below).
GAUSSIAN_SHAPES = {"means": (3,), "scales": (3,), "quats": (4,), "opacities": (), "sh0": (1, 3), "shN": (-1, 3),
                   "queries": (-1,)}
PAYLOAD_KEYS = ("gaussians", "query_dims", "sh_degree", "attentions", "identities", "world_frame", "config",
                "iteration", "views")
MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit on the JSON header


class CheckpointError(M3Error, ValueError):
    """A checkpoint that cannot be read as a memory; the message says why."""


@dataclass
class Memory:
    """A trained memory: the Gaussians, one decoder and extractor identity per model. The decoder is M3's memory
    attention (PSC bank + Wm) or, for the distillation baseline, its `FeatureDecoder` MLP."""

    gaussians: GaussianModel
    attentions: dict[str, Decoder]   # per model: MemoryAttention (M3) or FeatureDecoder (the baseline)
    identities: dict[str, dict]
    world_frame: str = "world"
    config: dict = field(default_factory=dict)
    iteration: int = 0
    views: TrainingViews | None = None   # the training cameras
    # provenance, one entry per scan that built it (`trainer.scan_source`: source, views, frame_ids, timestamps_ns,
    # added_utc); files written before it existed load with []
    sources: list[dict] = field(default_factory=list)

    def render(self, camera: Camera, models: Sequence[str] = ()) -> RenderedView:
        """Colour, alpha, depth and, per model of `models`, decoded features from `camera` (`views.render_memory`)."""
        return render_memory(self, camera, models)

    @property
    def models(self) -> list[str]:
        return list(self.attentions)

    def bank_sizes(self) -> dict[str, int]:
        """PSC rows per model, for the decoders that have a bank."""
        return {name: a.bank_size for name, a in self.attentions.items() if a.bank_size is not None}

    def num_parameters(self) -> int:
        """Learned + stored numbers: Gaussian parameters and every decoder's parameters and buffers (M3: PSC + Wm)."""
        gaussian = sum(p.numel() for p in self.gaussians.parameters())
        return gaussian + sum(t.numel() for a in self.attentions.values() for t in [*a.parameters(), *a.buffers()])


def _decoder_entry(decoder: MemoryAttention | FeatureDecoder) -> dict:
    """What `_load_decoder` needs to rebuild `decoder`: its kind, settings and tensors (on the CPU)."""
    state = {k: v.detach().cpu() for k, v in decoder.state_dict().items()}
    if isinstance(decoder, FeatureDecoder):
        return {"kind": "mlp", "dims": list(decoder.dims), "state": state}
    return {"kind": "attention", "state": state, "temperature": decoder.temperature,
            "learnable_wm": isinstance(decoder.wm, torch.nn.Parameter), "top_k": decoder.top_k}


def _load_decoder(entry: dict) -> MemoryAttention | FeatureDecoder:
    if entry["kind"] == "attention":
        return MemoryAttention.from_state_dict(entry["state"], temperature=entry["temperature"],
                                               learnable_wm=entry["learnable_wm"], top_k=entry.get("top_k", 0))
    latent, hidden, feature = entry["dims"]
    decoder = FeatureDecoder(latent, feature, hidden)
    decoder.load_state_dict(entry["state"])
    return decoder


def _views_payload(views: TrainingViews | None) -> dict:
    """Training cameras as plain data (what the schema check reads)."""
    if views is None:
        return {"c2w": None, "K": None, "width": None, "height": None}
    return {"c2w": views.c2w, "K": views.K, "width": views.width, "height": views.height}


def _views_from_payload(views: dict) -> TrainingViews:
    """`Memory.views` of checked training cameras."""
    return TrainingViews(np.asarray(views["c2w"], dtype=np.float64), np.asarray(views["K"], dtype=np.float64),
                         int(views["width"]), int(views["height"]))


# --- the safetensors encoding: tensors by name, the rest as JSON with references ---

def _pack(value, where: str, tensors: dict[str, torch.Tensor]):
    """JSON-able form of `value`, moving tensors and numpy arrays into `tensors` (named by their place)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        name = where if where not in tensors else f"{where}#{len(tensors)}"
        if isinstance(value, np.ndarray):   # a private copy: safetensors refuses arrays sharing memory
            tensors[name] = torch.from_numpy(np.array(value, copy=True, order="C"))
            return {"$ndarray": name}
        tensors[name] = value.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_pack(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _pack(v, f"{where}.{k}", tensors) for k, v in value.items()}
        # int keys (optimizer state) and keys that look like our tags keep their type as [key, value] pairs
        return {"$items": [[_pack(k, f"{where}.{i}k", tensors), _pack(v, f"{where}.{i}", tensors)]
                           for i, (k, v) in enumerate(value.items())]}
    raise CheckpointError(f"cannot store a {type(value).__name__} at {where} in a checkpoint")


def _unpack(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        return tensors[value["$ndarray"]].numpy()
    if "$tuple" in value:
        return tuple(_unpack(v, tensors) for v in value["$tuple"])
    if "$items" in value:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["$items"]}
    return {k: _unpack(v, tensors) for k, v in value.items()}


def _encode(payload: dict) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    packed = _pack(payload, "m", tensors)
    return save_safetensors(tensors, metadata={"format": CHECKPOINT_FORMAT, "payload": json.dumps(packed)})


def _header(head: bytes) -> dict | None:
    """The JSON header of safetensors bytes (`head`: at least the first 8 + header-length bytes), or None when they
    are not safetensors."""
    if len(head) < 10:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= MAX_HEADER_BYTES or head[8:9] != b"{" or len(head) < 8 + length:
        return None
    try:
        header = json.loads(head[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _pickled_format(data: bytes) -> str | None:
    """The m3 format string inside a torch.save zip's pickle, found by reading opcodes (nothing is executed)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            for op, arg, _ in pickletools.genops(archive.read(name)):
                if isinstance(arg, str) and arg.startswith("m3-memory/"):
                    return arg
    except Exception:  # not a zip, no pickle inside, a malformed opcode stream: not a memory we recognise
        return None
    return None


def memory_format(path: str | Path) -> str | None:
    """The memory format of the file at `path` ("m3-memory/2", "m3-memory/1", ...) or None when it is not a memory
    (or unreadable); reads bytes only. Used to tell a memory, which may be replaced, from any other file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) == 8 and 2 <= struct.unpack("<Q", head)[0] <= MAX_HEADER_BYTES:
                head += handle.read(struct.unpack("<Q", head)[0])
            header = _header(head)
            if header is not None:
                found = (header.get("__metadata__") or {}).get("format")
                return found if isinstance(found, str) and found.startswith("m3-memory/") else None
            if head[:4] == b"PK\x03\x04":
                handle.seek(0)
                return _pickled_format(handle.read())
    except OSError:
        return None
    return None


# --- the schema: what every loaded memory has ---

def _check(payload, path: Path) -> None:
    """CheckpointError listing what `payload` lacks to be a complete memory (read as `_build` reads it)."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a memory")
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a complete memory: it has no {', '.join(missing)}")
    problems: list[str] = []
    query_dims, sh_degree = payload["query_dims"], payload["sh_degree"]
    if not (isinstance(query_dims, dict) and query_dims
            and all(isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in query_dims.items())):
        problems.append(f"query_dims must map each model to a positive width, got {query_dims!r}")
        query_dims = {}
    if not (isinstance(sh_degree, int) and 0 <= sh_degree <= 3):
        problems.append(f"sh_degree must be 0..3, got {sh_degree!r}")
        sh_degree = None
    layout = payload.get("query_layout", "split")   # files written before the shared layout are split
    if layout not in QUERY_LAYOUTS:
        problems.append(f"query_layout must be one of {QUERY_LAYOUTS}, got {layout!r}")
    problems += _gaussian_problems(payload["gaussians"], query_dims, sh_degree)
    # what each decoder reads: its slice, or the whole latent when shared
    widths = ({name: sum(query_dims.values()) for name in query_dims} if layout == "shared" else query_dims)
    problems += _decoder_problems(payload["attentions"], payload["identities"], widths)
    problems += _view_problems(payload["views"])
    if not isinstance(payload["world_frame"], str) or not payload["world_frame"]:
        problems.append(f"world_frame must be a frame name, got {payload['world_frame']!r}")
    if not isinstance(payload["config"], dict):
        problems.append(f"config must be a mapping, got {type(payload['config']).__name__}")
    if not (isinstance(payload["iteration"], int) and payload["iteration"] >= 0):
        problems.append(f"iteration must be a count, got {payload['iteration']!r}")
    sources = payload.get("sources", [])
    if not (isinstance(sources, list) and all(isinstance(s, dict) and isinstance(s.get("source"), str)
                                              and isinstance(s.get("views"), list) for s in sources)):
        problems.append("sources must be a list of scans, each with a source name and its views")
    state = payload.get("training_state")
    if state is not None and not isinstance(state, dict):
        problems.append(f"training_state must be a mapping, got {type(state).__name__}")
    if problems:
        raise CheckpointError(f"{path} is not a complete memory: {'; '.join(problems)}")


def _gaussian_problems(gaussians, query_dims: dict, sh_degree: int | None) -> list[str]:
    if not isinstance(gaussians, dict):
        return [f"gaussians must map parameter names to tensors, got {type(gaussians).__name__}"]
    missing = [name for name in GAUSSIAN_SHAPES if not isinstance(gaussians.get(name), torch.Tensor)]
    if missing:
        return [f"Gaussian tensors {missing} are missing"]
    n = gaussians["means"].shape[0] if gaussians["means"].ndim else 0
    if n == 0:
        return ["the memory has no Gaussians"]
    expected = dict(GAUSSIAN_SHAPES)
    expected["queries"] = (sum(query_dims.values()),) if query_dims else None
    expected["shN"] = ((sh_degree + 1) ** 2 - 1, 3) if sh_degree is not None else None
    problems = []
    for name, tail in expected.items():
        shape = tuple(gaussians[name].shape)
        if tail is not None and shape != (n, *tail):
            problems.append(f"Gaussian {name} has shape {list(shape)}, expected {[n, *tail]}")
        if not gaussians[name].is_floating_point():
            problems.append(f"Gaussian {name} is {gaussians[name].dtype}, expected floating point")
    unknown = sorted(set(gaussians) - set(GAUSSIAN_SHAPES))
    if unknown:
        problems.append(f"unknown Gaussian tensors {unknown}")
    return problems


def _decoder_problems(attentions, identities, query_dims: dict) -> list[str]:
    if not isinstance(attentions, dict) or not attentions:
        return ["the memory has no model (no decoder)"]
    problems = []
    if query_dims and set(attentions) != set(query_dims):
        problems.append(f"decoders {sorted(attentions)} do not match the query slices {sorted(query_dims)}")
    for name, entry in attentions.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("state"), dict):
            problems.append(f"decoder {name!r} has no tensors")
            continue
        state, width = entry["state"], query_dims.get(name)
        kind = entry.get("kind")
        if kind == "attention":
            wm, psc = state.get("wm"), state.get("psc")
            if not (isinstance(wm, torch.Tensor) and isinstance(psc, torch.Tensor) and wm.ndim == 2 and psc.ndim == 2
                    and psc.shape[0] > 0 and wm.shape[1] == psc.shape[1]):
                problems.append(f"decoder {name!r} needs wm [l, d] and a non-empty psc [t, d]")
            elif width is not None and wm.shape[0] != width:
                problems.append(f"decoder {name!r} takes {wm.shape[0]} query dims, its slice has {width}")
            temperature = entry.get("temperature")
            if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
                problems.append(f"decoder {name!r} temperature must be positive, got {temperature!r}")
            if not isinstance(entry.get("learnable_wm"), bool):
                problems.append(f"decoder {name!r} has no learnable_wm flag")
            top_k = entry.get("top_k", 0)
            if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
                problems.append(f"decoder {name!r} top_k must be 0 (dense) or a row count, got {top_k!r}")
        elif kind == "mlp":
            dims = entry.get("dims")
            if not (isinstance(dims, (list, tuple)) and len(dims) == 3
                    and all(isinstance(d, int) and d > 0 for d in dims)):
                problems.append(f"decoder {name!r} needs dims [l, hidden, d], got {dims!r}")
            elif width is not None and dims[0] != width:
                problems.append(f"decoder {name!r} takes {dims[0]} query dims, its slice has {width}")
        else:
            problems.append(f"decoder {name!r} is of kind {kind!r}; this version reads 'attention' and 'mlp'")
        identity = identities.get(name) if isinstance(identities, dict) else None
        if not (isinstance(identity, dict) and isinstance(identity.get("name"), str)):
            problems.append(f"model {name!r} has no feature-extractor identity (a dict with its name)")
    return problems


def _view_problems(views) -> list[str]:
    if not isinstance(views, dict):
        return [f"views must be the training cameras, got {type(views).__name__}"]
    c2w, K = views.get("c2w"), views.get("K")
    problems = []
    shapes = []
    for name, value, tail in (("c2w", c2w, (4, 4)), ("K", K, (3, 3))):
        shape = tuple(np.shape(value)) if isinstance(value, (np.ndarray, torch.Tensor)) else None
        if shape is None or len(shape) != 3 or shape[1:] != tail or shape[0] < 1:
            problems.append(f"views need {name} [n, {tail[0]}, {tail[1]}] with n >= 1, got "
                            f"{list(shape) if shape is not None else type(value).__name__}")
        elif not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            problems.append(f"views {name} is not finite")
        else:
            shapes.append(shape[0])
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        problems.append(f"views have {shapes[0]} poses but {shapes[1]} intrinsics")
    for name in ("width", "height"):
        value = views.get(name)
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0):
            problems.append(f"views need a positive image {name}, got {value!r}")
    return problems


# --- reading and writing ---

def _payload(memory: Memory, training_state: dict | None) -> dict:
    return {
        "gaussians": {name: p.detach().cpu() for name, p in memory.gaussians.params.items()},
        "query_dims": dict(memory.gaussians.query_dims),
        "query_layout": memory.gaussians.query_layout,
        "sh_degree": memory.gaussians.sh_degree,
        "attentions": {name: _decoder_entry(a) for name, a in memory.attentions.items()},
        "identities": memory.identities,
        "world_frame": memory.world_frame,
        "config": memory.config,
        "iteration": memory.iteration,
        "views": _views_payload(memory.views),
        "sources": memory.sources,
        "training_state": training_state,
    }


def _to_device(value, device):
    """Every tensor in a nested structure moved to `device` (numpy arrays and the rest as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def save_memory(path: str | Path, memory: Memory, training_state: dict | None = None) -> Path:
    """Write `memory` (and optional optimizer/strategy state for resuming) to `path` atomically, as "m3-memory/2".
    An incomplete memory is refused (CheckpointError) before anything is written."""
    payload = _payload(memory, training_state)
    _check(payload, Path(path))
    data = _encode(payload)
    return write_atomic(path, lambda handle: handle.write(data))


def _read(data: bytes, path: Path, device, trusted: bool) -> dict:
    """The payload dict of checkpoint bytes: safetensors parsed, a pickle unpickled only when `trusted`."""
    header = _header(data)
    if header is not None:
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has format {metadata.get('format')!r}; this version reads "
                                  f"{CHECKPOINT_FORMAT!r}: retrain the memory with this version")
        tensors = load_safetensors(data)
        return _unpack(json.loads(metadata["payload"]), tensors)
    if data[:4] == b"PK\x03\x04" or data[:2] == b"\x80\x02":   # torch.save zip, or its legacy raw pickle
        if not trusted:
            found = _pickled_format(data)
            raise CheckpointError(
                f"{path} is a torch pickle ({found or 'no m3 format found'}); loading a pickle can run any code, "
                f"so it is refused: load it with trusted=True (m3_memory.core.checkpoint.load_memory) only if you made "
                f"it yourself, then save it again as {CHECKPOINT_FORMAT!r}, or retrain the memory with this version")
        warnings.warn(f"loading {path} as a trusted torch pickle: it could have run any code; save it again with this "
                      f"version to get a {CHECKPOINT_FORMAT!r} file", stacklevel=3)
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != PICKLE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path} has format {found!r}; this version reads {CHECKPOINT_FORMAT!r} and, "
                                  f"trusted, {PICKLE_FORMAT!r}: retrain the memory with this version")
        for entry in (payload.get("attentions") or {}).values():
            if isinstance(entry, dict):
                entry.setdefault("kind", "attention")   # written before the baseline joined the format
        return payload
    raise CheckpointError(f"{path} is not a readable checkpoint (neither {CHECKPOINT_FORMAT!r} safetensors nor a "
                          "torch pickle)")


def load_memory(path: str | Path, device: str | torch.device = "cpu",
                trusted: bool = False) -> tuple[Memory, dict | None]:
    """Read a memory written by `save_memory`; returns it and its training state (None when absent), on `device`.

    Anything that is not a complete memory raises CheckpointError saying why. `trusted=True` also reads the older
    "m3-memory/1" torch pickles (they can run code: only for files you made yourself), with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no memory checkpoint at {path}")
    try:
        payload = _read(path.read_bytes(), path, device, trusted)
        _check(payload, path)
        gaussians = GaussianModel(payload["gaussians"], payload["query_dims"], payload["sh_degree"],
                                  payload.get("query_layout", "split")).to(device)
        attentions = {name: _load_decoder(entry).to(device) for name, entry in payload["attentions"].items()}
        memory = Memory(gaussians, attentions, payload["identities"], payload["world_frame"], payload["config"],
                        payload["iteration"], _views_from_payload(payload["views"]), payload.get("sources", []))
        return memory, _to_device(payload.get("training_state"), device)
    except CheckpointError:
        raise
    except Exception as exc:  # torch, safetensors, json and the modules raise many types for a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
