"""On-disk feature cache: each image's dense features written once as float16 `.npy`, opened memory-mapped.

Layout: `root/<identity.key>/<image sha256>.npy` + `.json` sidecar holding the model identity, shape, dtype and a
sha256 of the `.npy` bytes. Both files are written to temporary names and renamed, sidecar last, so an entry exists
only once complete: a killed extraction leaves only whole entries (kept) and stray temporaries (ignored, cleaned).
An entry whose sidecar is missing or disagrees with its data (truncated, bit-flipped, another model) is recomputed.
One writing process per cache directory: opening a cache removes the temporaries a killed writer left behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from m3_memory.core.atomic import write_atomic
from m3_memory.core.features.base import FeatureExtractor, ModelIdentity

CACHE_FORMAT = 1


def image_sha256(image: np.ndarray) -> str:
    """Hex sha256 of an image's shape, dtype and pixel bytes (`image: [H, W, 3]` uint8)."""
    digest = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _bytes_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """Dense features of one extractor under `root/<identity key>/`, keyed by image content.

    `get(image)` returns the cached `[h, w, d]` float16 memmap (computing and storing it on a miss); `get_many`
    does the same for a batch, running the extractor only on the misses.
    """

    def __init__(self, root: str | Path, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.identity: ModelIdentity = extractor.identity
        self.dir = Path(root) / self.identity.key
        self.dir.mkdir(parents=True, exist_ok=True)
        for stray in self.dir.glob(".*.tmp"):  # left by a killed writer; never part of an entry
            stray.unlink(missing_ok=True)
        self._verified: set[str] = set()
        self.recomputed = 0  # corrupt entries found and rewritten by this instance

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def load(self, key: str) -> np.ndarray | None:
        """The entry `key` as a read-only float16 memmap `[h, w, d]`, or None if absent or corrupt.

        The data checksum is checked on the first load of each entry per cache instance.
        """
        data_path, meta_path = self._paths(key)
        if not meta_path.exists() or not data_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT or ModelIdentity.from_json(meta["identity"]) != self.identity:
                return None
            if key not in self._verified and _bytes_sha256(data_path) != meta["sha256"]:
                return None
            array = np.load(data_path, mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None
        if list(array.shape) != meta["shape"] or array.dtype != np.float16:
            return None
        self._verified.add(key)
        return array

    def store(self, key: str, features: np.ndarray) -> np.ndarray:
        """Write `features: [h, w, d]` as float16 entry `key` (atomically) and return it memory-mapped."""
        data_path, meta_path = self._paths(key)
        half = np.ascontiguousarray(features, dtype=np.float16)
        write_atomic(data_path, lambda handle: np.save(handle, half))
        meta = {"format": CACHE_FORMAT, "identity": self.identity.to_json(), "shape": list(half.shape),
                "dtype": "float16", "sha256": _bytes_sha256(data_path)}
        write_atomic(meta_path, lambda handle: handle.write((json.dumps(meta) + "\n").encode()))
        self._verified.add(key)
        return np.load(data_path, mmap_mode="r")

    def contains(self, key: str) -> bool:
        return self.load(key) is not None

    def get_many(self, images: np.ndarray) -> list[np.ndarray]:
        """`images: [B, H, W, 3]` uint8 -> B float16 memmaps `[h, w, d]`; only uncached images are extracted."""
        keys = [image_sha256(image) for image in images]
        out = [self.load(key) for key in keys]
        missing = [i for i, array in enumerate(out) if array is None]
        if missing:
            self.recomputed += sum(self._paths(keys[i])[1].exists() for i in missing)
            features = self.extractor.dense(np.stack([images[i] for i in missing])).cpu().numpy()
            for j, i in enumerate(missing):
                out[i] = self.store(keys[i], features[j])
        return out

    def get(self, image: np.ndarray) -> np.ndarray:
        """`image: [H, W, 3]` uint8 -> float16 memmap `[h, w, d]` (cached)."""
        return self.get_many(image[None])[0]


def extract_scene(scene, extractor: FeatureExtractor, cache: FeatureCache,
                  progress: Callable[[int, int], None] | None = None, batch: int | None = None) -> list[np.ndarray]:
    """Features of every view of `scene` (a `m3_memory.core.scene.Scene`) through `cache`, in frame order.

    Returns one float16 memmap `[h, w, d]` per view. Views already cached are not recomputed, so a killed run
    resumes where it stopped. `progress(done, total)` is called after each batch of views.
    """
    batch = batch or extractor.batch_size
    out: list[np.ndarray] = []
    for start in range(0, len(scene), batch):
        images = np.stack([scene.image(i) for i in range(start, min(start + batch, len(scene)))])
        out += cache.get_many(images)
        if progress is not None:
            progress(len(out), len(scene))
    return out
