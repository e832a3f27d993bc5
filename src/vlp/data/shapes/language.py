"""Captions: the words, the templates, and the structured form every caption goes through.

A caption is a `Claim` (the objects it mentions and the relation it asserts). `_render` turns a
claim into text, choosing among synonyms and templates; `parse_caption` turns any shapes-world
text back into a claim, so `caption_is_true` can check a caption, a generated one too, against a
scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlp.data.shapes.scene import COLORS, _pick, relation_holds, true_relations

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

# Caption templates by (number of objects mentioned, whether a relation between {0} and {1} is).
_TEMPLATES = {
    (1, False): (
        "{0}",
        "there is {0}",
        "a picture of {0}",
        "an image of {0}",
        "{0} on a noisy background",
        "a drawing of {0}",
    ),
    (2, False): ("{0} and {1}", "there is {0} and {1}", "a picture of {0} and {1}"),
    (2, True): ("{0} {r} {1}", "there is {0} {r} {1}", "a picture of {0} {r} {1}", "{0} is {r} {1}"),
    (3, True): (
        "{0} {r} {1}, and {2}",
        "a picture of {0} {r} {1}, and {2}",
        "{2}, and {0} {r} {1}",
        "there is {0} {r} {1}, and also {2}",
    ),
}
_FILLER = {
    "a",
    "an",
    "the",
    "there",
    "is",
    "of",
    "and",
    "also",
    "to",
    "picture",
    "image",
    "drawing",
    "on",
    "noisy",
    "background",
}


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


# --- parsing -------------------------------------------------------------------------------------


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
        if (obj["color"], obj["shape"]) == (mention.color, mention.shape) and mention.size in (None, obj["size"]):
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
