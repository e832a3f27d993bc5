"""BEiT-3 (Wang et al. 2023, "Image as a Foreign Language"): VLMo's multiway transformer trained
with one objective, masked data modeling, over images, texts and image-text pairs.

Sec. 2.2: images are "Imglish": block-wise masked patches (about 40 %) predict visual token ids;
texts are masked (15 %) and predicted in text-only mode; image-text pairs have 50 % of their
text masked, predicted with the image visible (fusion mode). BEiT-3 draws the three kinds from
separate corpora; here each batch gives all three (its images, its captions and its pairs).
Same architecture and code as VLMo: only the objectives and masking rates differ, so the
recipe is configuration. Retrieval fine-tunes the V and L paths with ITC
(`vlp train beit3_retrieval --init RUN`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlp.models.registry import register
from vlp.models.vlmo import VLMo, VLMoConfig


@dataclass
class BEiT3Config(VLMoConfig):
    objectives: tuple[str, ...] = ("mim", "text_mlm", "mlm")
    mlm_probability: float = 0.5  # pairs: half of the text hidden, the image visible


@register("beit3", BEiT3Config)
class BEiT3(VLMo):
    """VLMo's model with BEiT-3's defaults (see the module docstring)."""
