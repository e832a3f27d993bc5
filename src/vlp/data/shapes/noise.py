"""Caption noise: how a train caption is made false of its scene, as web captions often are.

`ShapesWorld` corrupts a fraction of the train captions with one of `NOISE_KINDS`: a caption of
another scene ("random"), a colour or shape no object has ("attribute"), or the opposite relation
("relation"); the corrupted sample keeps its clean caption in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vlp.data.shapes.language import Claim, _find
from vlp.data.shapes.scene import (
    OPPOSITE,
    RELATIONS,
    SHAPES,
    _absent_colors,
    _allowed,
    _pick,
    relation_holds,
)

NOISE_KINDS = ("random", "attribute", "relation")


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
    return replace(claim, mentions=claim.mentions[:k] + (wrong,) + claim.mentions[k + 1 :])


def _invert_relation(claim: Claim, objects: Sequence[dict], rng: np.random.Generator) -> Claim:
    """Invert the claim's relation or, for "x and y", assert the opposite of a true one."""
    if claim.relations:
        a, rel, b = claim.relations[0]
    else:
        a, b = 0, 1
        first, second = (_find(claim.mentions[k], objects) for k in (a, b))
        rel = _pick(rng, [r for r in RELATIONS if relation_holds(first, r, second)])
    return replace(claim, relations=((a, OPPOSITE[rel], b),))
