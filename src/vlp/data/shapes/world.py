"""The world: sample `i` of a split as a pure function of `(seed, split, i)`.

`ShapesWorld` lays a scene out, captions it (one possibly noisy caption in the train split,
paraphrases elsewhere), attaches the tasks and draws the image, each from its own random stream.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlp.data.sample import Sample
from vlp.data.shapes.language import _captions, _claim, _render, claim_holds
from vlp.data.shapes.noise import NOISE_KINDS, _corrupt_attribute, _invert_relation
from vlp.data.shapes.scene import (
    SIZES,
    _attributes,
    _draw,
    _pick,
    _try_place,
    true_relations,
)
from vlp.data.shapes.tasks import _qa, _swaps

SPLITS = ("train", "val", "test", "clean", "classify", "compositional")
_RANDOM_CAPTION_SPACE = 1000  # SeedSequence slot for the scenes "random" noise captions come from
_EVAL_CAPTIONS = 5


@dataclass
class ShapesWorld:
    """The procedural world; `noise` is the fraction of corrupted train captions."""

    seed: int = 0
    image_size: int = 64
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {self.image_size!r}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be between 0 and 1, got {self.noise!r}")

    def scene(self, split: str, i: int) -> dict:
        """Metadata of sample i (everything but the image), its captions under "captions"."""
        return self._scene(split, i, self._rngs(split, i))

    def sample(self, split: str, i: int) -> Sample:
        """Sample i of a split: image, captions and metadata."""
        rngs = self._rngs(split, i)
        meta = self._scene(split, i, rngs)
        captions = meta.pop("captions")
        image = _draw(meta["objects"], self.image_size, rngs[-1])
        return Sample(image=image, captions=captions, meta=meta, source=f"shapes:{split}:{i}")

    def _scene(self, split: str, i: int, rngs: list[np.random.Generator]) -> dict:
        layout_rng, text_rng, noise_rng, task_rng, _ = rngs
        objects = self._objects(split, layout_rng)
        meta: dict[str, Any] = {"split": split, "index": i}
        held_out_ok = split == "compositional"
        if split == "train":
            caption, flags = self._train_caption(objects, i, text_rng, noise_rng)
            meta["captions"] = [caption]
        else:
            meta["captions"] = _captions(objects, text_rng, _EVAL_CAPTIONS)
        meta["objects"] = objects
        meta["relations"] = true_relations(objects)
        if split == "classify":
            obj = objects[0]
            meta["labels"] = {
                "shape": obj["shape"],
                "color": obj["color"],
                "color_shape": f"{obj['color']} {obj['shape']}",
            }
        meta["qa"] = _qa(objects, task_rng, held_out_ok)
        meta["swaps"] = _swaps(objects, task_rng, held_out_ok)
        if split == "train":
            meta.update(flags)
        return meta

    def _rngs(self, split: str, i: int) -> list[np.random.Generator]:
        """Independent streams for layout, text, noise, tasks and pixels of one sample."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"sample index must be a non-negative integer, got {i!r}")
        return np.random.default_rng([self.seed, SPLITS.index(split), int(i)]).spawn(5)

    def _objects(self, split: str, rng: np.random.Generator) -> list[dict]:
        n = 1 if split == "classify" else _pick(rng, (1, 2, 2, 3, 3))  # 20 % one object
        pairs = _attributes(n, split == "compositional", rng)
        sizes = [_pick(rng, SIZES) for _ in pairs]
        sizes, centres = self._place(sizes, rng)
        return [
            {"shape": shape, "color": color, "size": size, "x": x, "y": y, "r": self._radius(size)}
            for (color, shape), size, (x, y) in zip(pairs, sizes, centres)
        ]

    def _radius(self, size: str) -> int:
        return round((0.10 if size == "small" else 0.18) * self.image_size)

    def _place(self, sizes: list[str], rng: np.random.Generator) -> tuple[list[str], list]:
        """Centres for the objects; large ones shrink to small while they do not fit."""
        margin = -(-6 * self.image_size // 100)  # ceil(0.06 * image_size)
        while (centres := _try_place([self._radius(s) for s in sizes], self.image_size, margin, rng)) is None:
            sizes = list(sizes)
            sizes[sizes.index("large")] = "small"  # all-small scenes always fit at >= 32 px
        return sizes, centres

    def _train_caption(
        self, objects: list[dict], i: int, text_rng: np.random.Generator, noise_rng: np.random.Generator
    ) -> tuple[str, dict]:
        """The one train caption, corrupted with probability `noise`, and its noise flags."""
        claim = _claim(objects, text_rng)
        style = int(text_rng.integers(2**63))  # the same words for the clean and noisy text
        clean = _render(claim, np.random.default_rng(style))
        draw, kind_draw = noise_rng.random(2)  # drawn at any noise level: samples stay put
        if draw >= self.noise:
            return clean, {"noisy": False, "noise_kind": None, "clean_caption": clean}
        kind = NOISE_KINDS[int(kind_draw * len(NOISE_KINDS))]
        if kind == "relation" and len(objects) == 1:
            kind = "attribute"
        if kind == "random":
            caption = self._random_caption(objects, i)
        else:
            corrupt = _corrupt_attribute if kind == "attribute" else _invert_relation
            caption = _render(corrupt(claim, objects, noise_rng), np.random.default_rng(style))
        return caption, {"noisy": True, "noise_kind": kind, "clean_caption": clean}

    def _random_caption(self, objects: list[dict], i: int) -> str:
        """A caption of another scene, from its own index space, that is false of this one."""
        for k in itertools.count():
            rng = np.random.default_rng([self.seed, _RANDOM_CAPTION_SPACE, i, k])
            claim = _claim(self._objects("train", rng), rng)
            if not claim_holds(claim, objects):
                return _render(claim, rng)
        raise AssertionError("unreachable")
