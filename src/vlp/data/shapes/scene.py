"""What a scene is made of: the shapes, colours and sizes, the relations between objects, and
how a scene is laid out and drawn.

The lowest module of the package: the others read the world's attributes and relations from here,
and draw their random choices with `_pick`, so that every sample is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),  # before jitter
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"))
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation_holds(a: dict, relation: str, b: dict) -> bool:
    """Whether object `a` is `relation` object `b`: bounding boxes apart with a 1 px gap."""
    gap = a["r"] + b["r"] + 1
    if relation == "left of":
        return b["x"] - a["x"] > gap
    if relation == "right of":
        return a["x"] - b["x"] > gap
    if relation == "above":  # image y grows downward
        return b["y"] - a["y"] > gap
    if relation == "below":
        return a["y"] - b["y"] > gap
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def true_relations(objects: Sequence[dict]) -> list[list]:
    """All [i, relation, j] that hold between the objects of a scene."""
    return [
        [i, rel, j]
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
        for rel in RELATIONS
        if i != j and relation_holds(a, rel, b)
    ]


def _pick(rng: np.random.Generator | None, options: Sequence) -> Any:
    """A uniform choice that always draws one number (so parallel renderings stay in step);
    the first option when rng is None."""
    return options[0] if rng is None else options[int(rng.random() * len(options))]


def _allowed(color: str, shape: str, held_out_ok: bool) -> bool:
    return held_out_ok or (color, shape) not in HELD_OUT


def _absent_colors(objects: Sequence[dict], shape: str, held_out_ok: bool) -> list[str]:
    """Colours no object of the scene has, that may go with `shape`."""
    used = {o["color"] for o in objects}
    return [c for c in COLORS if c not in used and _allowed(c, shape, held_out_ok)]


# --- layout and pixels ---------------------------------------------------------------------------


def _attributes(n: int, compositional: bool, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Distinct shapes and colours; one held-out pair or more in compositional scenes, else none."""
    pairs = [_pick(rng, HELD_OUT)] if compositional else []
    shapes = [str(s) for s in rng.permutation(SHAPES) if s not in {p[1] for p in pairs}]
    for shape in shapes[: n - len(pairs)]:
        used = {c for c, _ in pairs}
        pairs.append((_pick(rng, [c for c in COLORS if c not in used and _allowed(c, shape, compositional)]), shape))
    return [pairs[k] for k in rng.permutation(n)]


def _try_place(
    radii: list[int], image_size: int, margin: int, rng: np.random.Generator, attempts: int = 20, candidates: int = 32
) -> list[tuple[int, int]] | None:
    """Centres keeping every pair of objects apart on some axis, or None if none were found."""
    for _ in range(attempts):
        placed: list[tuple[int, int]] = []
        for r in radii:
            xy = rng.integers(margin + r, image_size - margin - r, size=(candidates, 2))
            ok = np.ones(candidates, dtype=bool)
            for (px, py), pr in zip(placed, radii):
                gap = r + pr + 1
                ok &= (np.abs(xy[:, 0] - px) > gap) | (np.abs(xy[:, 1] - py) > gap)
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            placed.append((int(xy[hits[0], 0]), int(xy[hits[0], 1])))
        else:
            return placed
    return None


def _draw(objects: Sequence[dict], image_size: int, rng: np.random.Generator) -> Image.Image:
    """A gray-ish noisy background with the objects drawn on it in jittered colours."""
    base = rng.integers(20, 100) + rng.integers(-12, 13, size=3)
    pixels = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * 10.0 + base
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(min(255, max(0, c + int(d))) for c, d in zip(RGB[obj["color"]], jitter))
        x, y, r = obj["x"], obj["y"], obj["r"]
        if obj["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image
