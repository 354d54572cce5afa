"""How well a feature model grounds text: the checks tests, benchmark and trainer share.

- `photo_matching`: zero-shot text -> image on real scikit-image photographs (astronaut, coffee, cat, rocket).
- `composite_peaks`: the photos pasted side by side; each phrase's dense-score peak must land in its photo.
- `demo_object_peaks`: on demo-scene views, each visible object's phrase peak must land on the object's mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from m3_memory.core.features.base import FeatureExtractor

# concept -> (skimage.data function, phrases); the first phrase is the sanity-test query.
SANITY_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cat": ("chelsea", ("a cat", "a photo of a cat", "cat", "tabby cat")),
    "coffee": ("coffee", ("a cup of coffee", "cup of coffee", "coffee", "a picture of coffee")),
    "astronaut": ("astronaut", ("an astronaut", "astronaut", "a person in a space suit")),
    "rocket": ("rocket", ("a rocket", "rocket", "a rocket launch")),
}
HELDOUT_FRACTION = 0.25  # the last quarter of a scene's views (a contiguous arc of the trajectory) is never trained on


def load_photo(name: str, size: int | None = None) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB of `skimage.data.<name>()` (grey -> RGB), optionally resized to `size x size`."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3].astype(np.uint8)
    if size is not None:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def sanity_photos(size: int = 224) -> tuple[list[str], np.ndarray]:
    """`(queries [4], photos [4, size, size, 3] uint8)`: query i describes photo i."""
    queries = [phrases[0] for _, phrases in SANITY_PHOTOS.values()]
    return queries, np.stack([load_photo(name, size) for name, _ in SANITY_PHOTOS.values()])


def photo_matching(extractor: FeatureExtractor, size: int = 224) -> dict:
    """Text -> image top-1 over the sanity photos: `{"accuracy", "picked": [4], "similarity": [4][4]}`."""
    queries, photos = sanity_photos(size)
    similarity = extractor.encode_text(queries) @ extractor.encode_image(photos).T  # [Q, I]
    picked = similarity.argmax(dim=1).tolist()
    accuracy = float(np.mean([p == i for i, p in enumerate(picked)]))
    return {"accuracy": accuracy, "picked": picked, "similarity": similarity.tolist()}


def composite_peaks(extractor: FeatureExtractor, size: int = 224) -> dict:
    """The sanity photos side by side (`[size, 4 * size, 3]`); phrase i's dense peak must fall in column block i.

    Returns `{"accuracy", "peak_block": [4], "margin": [4]}` where margin = mean score inside the right photo minus the
    best mean score inside another photo (> 0 means the right photo wins on average too).
    """
    queries, photos = sanity_photos(size)
    composite = np.concatenate(list(photos), axis=1)[None]
    scores = torch.einsum("bhwd,qd->bqhw", extractor.dense(composite), extractor.encode_text(queries))[0]
    width = scores.shape[-1]
    peak_x = scores.flatten(1).argmax(dim=1) % width
    peak_block = (peak_x * 4 // width).tolist()
    # block_means[i, q]: mean score of query q inside photo i
    block_means = torch.stack([scores[:, :, i * width // 4 : (i + 1) * width // 4].mean(dim=(1, 2)) for i in range(4)])
    others = [torch.cat([block_means[:i, i], block_means[i + 1 :, i]]) for i in range(4)]
    margin = [float(block_means[i, i] - others[i].max()) for i in range(4)]
    accuracy = float(np.mean([b == i for i, b in enumerate(peak_block)]))
    return {"accuracy": accuracy, "peak_block": peak_block, "margin": margin}


@dataclass(frozen=True)
class DemoObject:
    """An object of a demo scene: mask value `index` (masks/<frame>.png) and its `phrases`."""

    index: int
    name: str
    phrases: tuple[str, ...]


def demo_objects(scene_root: str | Path) -> list[DemoObject]:
    data = json.loads((Path(scene_root) / "objects.json").read_text())
    return [DemoObject(o["index"], o["name"], tuple(o["phrases"])) for o in data["objects"]]


def demo_mask(scene_root: str | Path, frame_id: str) -> np.ndarray:
    """`[H, W]` uint8 object index per pixel (0 = background) of one demo keyframe."""
    with Image.open(Path(scene_root) / "masks" / f"{frame_id}.png") as image:
        return np.asarray(image)


def heldout_indices(n_views: int) -> list[int]:
    """Views never trained on: the last `HELDOUT_FRACTION` of the trajectory (at least one)."""
    return list(range(n_views - max(1, int(round(n_views * HELDOUT_FRACTION))), n_views))


def demo_object_peaks(extractor: FeatureExtractor, scene, indices: list[int], min_pixels: int = 200) -> dict:
    """Per visible object (>= `min_pixels` of mask) in views `indices`: does its first phrase peak on its mask?

    Returns `{"accuracy", "trials", "per_object": {name: [hits, trials]}}`.
    """
    objects = demo_objects(scene.root)
    text = extractor.encode_text([obj.phrases[0] for obj in objects])  # [O, d]
    per_object = {obj.name: [0, 0] for obj in objects}
    for index in indices:
        mask = demo_mask(scene.root, scene.frames[index].frame_id)
        features = extractor.dense(scene.image(index)[None])[0]  # [h, w, d]
        scores = torch.einsum("hwd,od->ohw", features, text)
        h, w = features.shape[:2]
        small = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        for k, obj in enumerate(objects):
            if (mask == obj.index).sum() < min_pixels:
                continue
            peak = int(scores[k].flatten().argmax())
            per_object[obj.name][0] += int(small.flat[peak] == obj.index)
            per_object[obj.name][1] += 1
    hits, trials = (sum(v[i] for v in per_object.values()) for i in (0, 1))
    return {"accuracy": hits / max(trials, 1), "trials": trials, "per_object": per_object}
