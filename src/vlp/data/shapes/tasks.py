"""The evaluation tasks a scene carries: VQA pairs, true/false swap pairs for the
compositional probe, and the class names of zero-shot classification."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vlp.data.shapes.language import Claim, Mention, _render, _with_article
from vlp.data.shapes.scene import (
    COLORS,
    HELD_OUT,
    OPPOSITE,
    SHAPES,
    _absent_colors,
    _allowed,
    _pick,
    true_relations,
)

_NUMBERS = ("one", "two", "three")


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
        color, shape = _pick(
            rng, [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and _allowed(c, s, held_out_ok)]
        )
        answer = "no"
    qa.append((f"is there {_with_article(f'{color} {shape}')}?", answer, "exists"))
    if len(objects) > 1:
        i, rel, j = _pick(rng, true_relations(objects))
        answer = "yes" if rng.random() < 0.5 else "no"
        asked = rel if answer == "yes" else OPPOSITE[rel]
        a, b = objects[i], objects[j]
        qa.append((f"is the {a['color']} {a['shape']} {asked} the {b['color']} {b['shape']}?", answer, "relation"))
    return [{"question": q, "answer": a, "type": t} for q, a, t in qa]


def _attribute_swap(objects: Sequence[dict], rng: np.random.Generator, held_out_ok: bool) -> tuple[Claim, Claim]:
    """Exchange the colours of two objects or, where none can, replace one object's colour."""
    full = [Mention(o["color"], o["shape"], o["size"]) for o in objects]
    pairs = [
        (a, b)
        for a, b in itertools.combinations(full, 2)
        if _allowed(b.color, a.shape, held_out_ok) and _allowed(a.color, b.shape, held_out_ok)
    ]
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
        swaps.append(
            {
                "true": _render(Claim((a, b), ((0, rel, 1),)), None),
                "false": _render(Claim((b, a), ((0, rel, 1),)), None),
                "kind": "relation",
            }
        )
    return swaps


# --- classification ------------------------------------------------------------------------------


def class_names(task: str) -> list[str]:
    """Class names for zero-shot classification: task "shape", "color" or "color_shape"."""
    if task == "shape":
        return list(SHAPES)
    if task == "color":
        return list(COLORS)
    if task == "color_shape":
        return sorted(f"{c} {s}" for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)
    raise ValueError(f"unknown task {task!r}; expected 'shape', 'color' or 'color_shape'")
