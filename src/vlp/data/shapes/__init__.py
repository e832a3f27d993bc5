"""The shapes world: vlp's procedural, index-addressable image-caption data set.

Sample `i` of a split is a pure function of `(seed, split, i)`: a noisy background with one to
three coloured shapes, captions generated from the scene graph (with paraphrases), VQA pairs,
attribute/relation swap pairs for the compositional probe, classification labels (classify
split) and, in the train split, optional caption noise flagged in the metadata.

Every caption goes through a structured form, `Claim` (the objects it mentions and the relation
it asserts), so `caption_is_true` can check any caption, a generated one too, against a scene.
`write_shapes` puts splits on disk in the formats the real-data readers read.

The modules, each importing only those above it:

- `scene`: shapes, colours, sizes and relations; layout and drawing of a scene.
- `language`: words, templates, `Claim`; rendering captions and parsing them back.
- `noise`: the corruptions of noisy train captions.
- `tasks`: VQA pairs, swap pairs and the class names of zero-shot classification.
- `world`: `ShapesWorld`, one sample from `(seed, split, i)`.
- `writer`: `write_shapes` and the on-disk formats.
"""

from vlp.data.shapes.language import (
    PROMPT_TEMPLATES,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    Claim,
    Mention,
    caption_is_true,
    claim_holds,
    parse_caption,
)
from vlp.data.shapes.noise import NOISE_KINDS
from vlp.data.shapes.scene import (
    COLORS,
    HELD_OUT,
    OPPOSITE,
    RELATIONS,
    RGB,
    SHAPES,
    SIZES,
    relation_holds,
    true_relations,
)
from vlp.data.shapes.tasks import class_names
from vlp.data.shapes.world import SPLITS, ShapesWorld
from vlp.data.shapes.writer import FORMATS, Record, write_shapes

__all__ = [
    "COLORS",
    "FORMATS",
    "HELD_OUT",
    "NOISE_KINDS",
    "OPPOSITE",
    "PROMPT_TEMPLATES",
    "RELATIONS",
    "RELATION_WORDS",
    "RGB",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_WORDS",
    "SPLITS",
    "Claim",
    "Mention",
    "Record",
    "ShapesWorld",
    "caption_is_true",
    "claim_holds",
    "class_names",
    "parse_caption",
    "relation_holds",
    "true_relations",
    "write_shapes",
]
