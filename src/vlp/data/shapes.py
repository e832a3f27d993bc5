"""The shapes world: vlp's procedural, index-addressable image-caption data set.

Sample `i` of a split is a pure function of `(seed, split, i)`: a noisy background with one to
three coloured shapes, captions generated from the scene graph (with paraphrases), VQA pairs,
attribute/relation swap pairs for the compositional probe, classification labels (classify
split) and, in the train split, optional caption noise flagged in the metadata.

Every caption goes through a structured form, `Claim` (the objects it mentions and the relation
it asserts), so `caption_is_true` can check any caption, a generated one too, against a scene.
`write_shapes` puts splits on disk in the formats the real-data readers read.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import MofNCompleteColumn, Progress

from vlp.data.formats import write_webdataset
from vlp.data.sample import Sample

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230),  # before jitter
       "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"))
SPLITS = ("train", "val", "test", "clean", "classify", "compositional")
NOISE_KINDS = ("random", "attribute", "relation")
FORMATS = ("wds", "jsonl", "csv")
PROMPT_TEMPLATES = [
    "a {}",
    "a picture of a {}",
    "an image of a {}",
    "there is a {}",
    "a {} on a noisy background",
    "a drawing of a {}",
]

# Words a caption may use; the first of each tuple is the plain word (used by swap pairs).
SHAPE_WORDS = {
    "circle": ("circle", "disk", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Caption templates by (number of objects mentioned, whether a relation between {0} and {1} is).
_TEMPLATES = {
    (1, False): ("{0}", "there is {0}", "a picture of {0}", "an image of {0}",
                 "{0} on a noisy background", "a drawing of {0}"),
    (2, False): ("{0} and {1}", "there is {0} and {1}", "a picture of {0} and {1}"),
    (2, True): ("{0} {r} {1}", "there is {0} {r} {1}", "a picture of {0} {r} {1}",
                "{0} is {r} {1}"),
    (3, True): ("{0} {r} {1}, and {2}", "a picture of {0} {r} {1}, and {2}",
                "{2}, and {0} {r} {1}", "there is {0} {r} {1}, and also {2}"),
}
_FILLER = {"a", "an", "the", "there", "is", "of", "and", "also", "to", "picture", "image",
           "drawing", "on", "noisy", "background"}
_NUMBERS = ("one", "two", "three")
_RANDOM_CAPTION_SPACE = 1000  # SeedSequence slot for the scenes "random" noise captions come from
_EVAL_CAPTIONS = 5


@dataclass(frozen=True)
class Mention:
    """One object as a caption names it; `size` is None when the caption leaves it out."""

    color: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Claim:
    """What a caption asserts: these objects exist, and these (a, relation, b) hold between them."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...] = ()


def class_names(task: str) -> list[str]:
    """Class names for zero-shot classification: task "shape", "color" or "color_shape"."""
    if task == "shape":
        return list(SHAPES)
    if task == "color":
        return list(COLORS)
    if task == "color_shape":
        return sorted(f"{c} {s}" for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)
    raise ValueError(f"unknown task {task!r}; expected 'shape', 'color' or 'color_shape'")


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
    return [[i, rel, j] for i, a in enumerate(objects) for j, b in enumerate(objects)
            for rel in RELATIONS if i != j and relation_holds(a, rel, b)]


def _head(phrase: str) -> str:
    """The word that carries a relation phrase: "to the left of" -> "left"."""
    return next(word for word in phrase.split() if word not in _FILLER)


_LEXICON = {  # word -> (kind, value); filler words are skipped
    **{c: ("color", c) for c in COLORS},
    **{w: ("shape", s) for s, words in SHAPE_WORDS.items() for w in words},
    **{w: ("size", s) for s, words in SIZE_WORDS.items() for w in words},
    **{_head(w): ("relation", r) for r, words in RELATION_WORDS.items() for w in words},
}


def parse_caption(text: str) -> Claim:
    """Parse a shapes-world caption into the objects it mentions and the relations it asserts."""
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    size = color = relation = None
    for word in text.lower().replace(",", " ").split():
        if word in _FILLER:
            continue
        if word not in _LEXICON:
            raise ValueError(f"unknown word {word!r} in caption {text!r}")
        kind, value = _LEXICON[word]
        if kind == "size":
            size = value
        elif kind == "color":
            color = value
        elif kind == "relation":
            if not mentions or relation:
                raise ValueError(f"{word!r} has no object before it in caption {text!r}")
            relation = value
        elif color is None:
            raise ValueError(f"{word!r} has no colour in caption {text!r}")
        else:
            mentions.append(Mention(color, value, size))
            if relation:
                relations.append((len(mentions) - 2, relation, len(mentions) - 1))
            size = color = relation = None
    if size or color or relation:
        raise ValueError(f"caption {text!r} ends in the middle of a description")
    return Claim(tuple(mentions), tuple(relations))


def _find(mention: Mention, objects: Sequence[dict]) -> dict | None:
    for obj in objects:
        if (obj["color"], obj["shape"]) == (mention.color, mention.shape) and \
                mention.size in (None, obj["size"]):
            return obj
    return None


def claim_holds(claim: Claim, objects: Sequence[dict]) -> bool:
    """Whether every mentioned object exists and every asserted relation holds."""
    found = [_find(m, objects) for m in claim.mentions]
    if any(obj is None for obj in found):
        return False
    return all(relation_holds(found[a], rel, found[b]) for a, rel, b in claim.relations)


def caption_is_true(text: str, objects: Sequence[dict]) -> bool:
    """Whether a caption is true of a scene (its "objects" metadata)."""
    return claim_holds(parse_caption(text), objects)


# --- captions --------------------------------------------------------------------------------

def _pick(rng: np.random.Generator | None, options: Sequence) -> Any:
    """A uniform choice that always draws one number (so parallel renderings stay in step);
    the first option when rng is None."""
    return options[0] if rng is None else options[int(rng.random() * len(options))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(m: Mention, rng: np.random.Generator | None) -> str:
    words = [_pick(rng, SIZE_WORDS[m.size])] if m.size else []
    return _with_article(" ".join([*words, m.color, _pick(rng, SHAPE_WORDS[m.shape])]))


def _render(claim: Claim, rng: np.random.Generator | None) -> str:
    """Text for a claim whose relation, if any, is (0, rel, 1); plain words when rng is None."""
    template = _pick(rng, _TEMPLATES[len(claim.mentions), bool(claim.relations)])
    phrases = [_noun_phrase(m, rng) for m in claim.mentions]
    relation = _pick(rng, RELATION_WORDS[claim.relations[0][1]]) if claim.relations else ""
    return template.format(*phrases, r=relation)


def _mention(obj: dict, rng: np.random.Generator) -> Mention:
    return Mention(obj["color"], obj["shape"], obj["size"] if rng.random() < 0.7 else None)


def _claim(objects: Sequence[dict], rng: np.random.Generator) -> Claim:
    """A random true claim: one object; two, with or without a relation; or all three."""
    if len(objects) == 1:
        return Claim((_mention(objects[0], rng),))
    if len(objects) == 2 and rng.random() < 0.4:
        return Claim(tuple(_mention(objects[k], rng) for k in rng.permutation(2)))
    i, rel, j = _pick(rng, true_relations(objects))
    order = [i, j] + [k for k in range(len(objects)) if k not in (i, j)]
    return Claim(tuple(_mention(objects[k], rng) for k in order), ((0, rel, 1),))


def _captions(objects: Sequence[dict], rng: np.random.Generator, count: int) -> list[str]:
    """Up to `count` distinct true captions (paraphrases) of a scene."""
    captions: list[str] = []
    for _ in range(50 * count):
        text = _render(_claim(objects, rng), rng)
        if text not in captions:
            captions.append(text)
        if len(captions) == count:
            break
    return captions


def _allowed(color: str, shape: str, held_out_ok: bool) -> bool:
    return held_out_ok or (color, shape) not in HELD_OUT


def _absent_colors(objects: Sequence[dict], shape: str, held_out_ok: bool) -> list[str]:
    """Colours no object of the scene has, that may go with `shape`."""
    used = {o["color"] for o in objects}
    return [c for c in COLORS if c not in used and _allowed(c, shape, held_out_ok)]


def _corrupt_attribute(claim: Claim, objects: Sequence[dict], rng: np.random.Generator) -> Claim:
    """Replace one mentioned colour or shape by one no object in the scene has."""
    k = int(rng.integers(len(claim.mentions)))
    m = claim.mentions[k]
    used = {o["shape"] for o in objects}
    shapes = [s for s in SHAPES if s not in used and _allowed(m.color, s, False)]
    if shapes and rng.random() < 0.5:
        wrong = replace(m, shape=_pick(rng, shapes))
    else:
        wrong = replace(m, color=_pick(rng, _absent_colors(objects, m.shape, False)))
    return replace(claim, mentions=claim.mentions[:k] + (wrong,) + claim.mentions[k + 1:])


def _invert_relation(claim: Claim, objects: Sequence[dict], rng: np.random.Generator) -> Claim:
    """Invert the claim's relation or, for "x and y", assert the opposite of a true one."""
    if claim.relations:
        a, rel, b = claim.relations[0]
    else:
        a, b = 0, 1
        first, second = (_find(claim.mentions[k], objects) for k in (a, b))
        rel = _pick(rng, [r for r in RELATIONS if relation_holds(first, r, second)])
    return replace(claim, relations=((a, OPPOSITE[rel], b),))


# --- questions and swap pairs ------------------------------------------------------------------

def _qa(objects: Sequence[dict], rng: np.random.Generator, held_out_ok: bool) -> list[dict]:
    """One question per type: color, shape, count, exists (yes/no balanced), relation."""
    obj = _pick(rng, objects)
    qa = [(f"what color is the {obj['shape']}?", obj["color"], "color")]
    obj = _pick(rng, objects)
    qa.append((f"what shape is the {obj['color']} object?", obj["shape"], "shape"))
    qa.append(("how many objects are there?", _NUMBERS[len(objects) - 1], "count"))
    present = [(o["color"], o["shape"]) for o in objects]
    if rng.random() < 0.5:
        color, shape = _pick(rng, present)
        answer = "yes"
    else:
        color, shape = _pick(rng, [(c, s) for c in COLORS for s in SHAPES
                                   if (c, s) not in present and _allowed(c, s, held_out_ok)])
        answer = "no"
    qa.append((f"is there {_with_article(f'{color} {shape}')}?", answer, "exists"))
    if len(objects) > 1:
        i, rel, j = _pick(rng, true_relations(objects))
        answer = "yes" if rng.random() < 0.5 else "no"
        asked = rel if answer == "yes" else OPPOSITE[rel]
        a, b = objects[i], objects[j]
        qa.append((f"is the {a['color']} {a['shape']} {asked} the {b['color']} {b['shape']}?",
                   answer, "relation"))
    return [{"question": q, "answer": a, "type": t} for q, a, t in qa]


def _attribute_swap(objects: Sequence[dict], rng: np.random.Generator,
                    held_out_ok: bool) -> tuple[Claim, Claim]:
    """Exchange the colours of two objects or, where none can, replace one object's colour."""
    full = [Mention(o["color"], o["shape"], o["size"]) for o in objects]
    pairs = [(a, b) for a, b in itertools.combinations(full, 2)
             if _allowed(b.color, a.shape, held_out_ok) and _allowed(a.color, b.shape, held_out_ok)]
    if pairs:
        a, b = _pick(rng, pairs)
        return Claim((a, b)), Claim((replace(a, color=b.color), replace(b, color=a.color)))
    m = _pick(rng, full)
    color = _pick(rng, _absent_colors(objects, m.shape, held_out_ok))
    return Claim((m,)), Claim((replace(m, color=color),))


def _swaps(objects: Sequence[dict], rng: np.random.Generator, held_out_ok: bool) -> list[dict]:
    """True captions with a false twin (ARO/SugarCrepe style), in plain words."""
    true, false = _attribute_swap(objects, rng, held_out_ok)
    swaps = [{"true": _render(true, None), "false": _render(false, None), "kind": "attribute"}]
    if len(objects) > 1:
        i, rel, j = _pick(rng, true_relations(objects))
        a, b = (Mention(o["color"], o["shape"], o["size"]) for o in (objects[i], objects[j]))
        swaps.append({"true": _render(Claim((a, b), ((0, rel, 1),)), None),
                      "false": _render(Claim((b, a), ((0, rel, 1),)), None), "kind": "relation"})
    return swaps


# --- layout and pixels ---------------------------------------------------------------------------

def _attributes(n: int, compositional: bool, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Distinct shapes and colours; one held-out pair or more in compositional scenes, else none."""
    pairs = [_pick(rng, HELD_OUT)] if compositional else []
    shapes = [str(s) for s in rng.permutation(SHAPES) if s not in {p[1] for p in pairs}]
    for shape in shapes[: n - len(pairs)]:
        used = {c for c, _ in pairs}
        pairs.append((_pick(rng, [c for c in COLORS if c not in used
                                  and _allowed(c, shape, compositional)]), shape))
    return [pairs[k] for k in rng.permutation(n)]


def _try_place(radii: list[int], image_size: int, margin: int, rng: np.random.Generator,
               attempts: int = 20, candidates: int = 32) -> list[tuple[int, int]] | None:
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


# --- the world -------------------------------------------------------------------------------

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
            meta["labels"] = {"shape": obj["shape"], "color": obj["color"],
                              "color_shape": f"{obj['color']} {obj['shape']}"}
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
        return [{"shape": shape, "color": color, "size": size, "x": x, "y": y,
                 "r": self._radius(size)}
                for (color, shape), size, (x, y) in zip(pairs, sizes, centres)]

    def _radius(self, size: str) -> int:
        return round((0.10 if size == "small" else 0.18) * self.image_size)

    def _place(self, sizes: list[str], rng: np.random.Generator) -> tuple[list[str], list]:
        """Centres for the objects; large ones shrink to small while they do not fit."""
        margin = -(-6 * self.image_size // 100)  # ceil(0.06 * image_size)
        while (centres := _try_place([self._radius(s) for s in sizes], self.image_size,
                                     margin, rng)) is None:
            sizes = list(sizes)
            sizes[sizes.index("large")] = "small"  # all-small scenes always fit at >= 32 px
        return sizes, centres

    def _train_caption(self, objects: list[dict], i: int, text_rng: np.random.Generator,
                       noise_rng: np.random.Generator) -> tuple[str, dict]:
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


# --- writing to disk ---------------------------------------------------------------------------

Record = tuple[int, bytes, list[str], dict]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _save_png(out: Path, split: str, i: int, png: bytes) -> str:
    path = f"{split}/{split}_{i:08d}.png"
    (out / path).write_bytes(png)
    return path


def _write_wds(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    samples = ((f"{split}_{i:08d}", png, {"caption": captions, **meta}) for i, png, captions, meta in records)
    write_webdataset(out / split, split, samples, shard_size)


def _write_jsonl(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    with open(out / f"{split}.jsonl", "w") as f:
        for i, png, captions, meta in records:
            path = _save_png(out, split, i, png)
            f.write(json.dumps({"image": path, "caption": captions, **meta}) + "\n")


def _write_csv(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    with open(out / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        for i, png, captions, _ in records:
            path = _save_png(out, split, i, png)
            writer.writerows([path, caption] for caption in captions)


_WRITERS: dict[str, Callable[[Path, str, Iterator[Record], int], None]] = {
    "wds": _write_wds, "jsonl": _write_jsonl, "csv": _write_csv}


def _records(world: ShapesWorld, split: str, count: int,
             advance: Callable[[], None]) -> Iterator[Record]:
    for i in range(count):
        sample = world.sample(split, i)
        yield i, _png(sample.image), sample.captions, sample.meta
        advance()


def write_shapes(out: Path, counts: dict[str, int], *, seed: int = 0, image_size: int = 64,
                 noise: float = 0.0, format: str = "wds", shard_size: int = 5000,
                 progress: bool = True) -> dict:
    """Write the given number of samples of each split under `out`; returns info.json's dict."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    for split, count in counts.items():
        if split not in SPLITS:
            raise ValueError(f"counts: unknown split {split!r}; expected one of {SPLITS}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"counts[{split!r}] must be a non-negative integer, got {count!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size!r}")
    world = ShapesWorld(seed=seed, image_size=image_size, noise=noise)
    out = Path(out)
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(),
                  disable=not progress) as bar:
        for split, count in counts.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            task = bar.add_task(f"shapes {split}", total=count)
            records = _records(world, split, count, partial(bar.advance, task))
            _WRITERS[format](out, split, records, shard_size)
    info = {
        "version": 1, "format": format, "seed": seed, "image_size": image_size, "noise": noise,
        "splits": dict(counts), "shapes": list(SHAPES), "colors": list(COLORS),
        "held_out": [list(pair) for pair in HELD_OUT], "prompt_templates": list(PROMPT_TEMPLATES),
        "classes": {task: class_names(task) for task in ("shape", "color", "color_shape")},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
