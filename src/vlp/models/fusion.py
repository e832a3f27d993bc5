"""What the fusion-encoder recipes (ALBEF, BLIP, and later VLMo and BLIP-2) share.

- `Momentum`: exponential-moving-average copies of some of a model's modules (ALBEF Sec. 3.3).
- `Contrast`: ITC with a learnable temperature; with momentum encoders, the keys are momentum
  features of the batch plus feature queues, and the targets are softened by the momentum
  model's own similarities (momentum distillation, ALBEF Sec. 3.3). Without momentum it is the
  plain in-batch loss, gathered across ranks.
- `FusionModel`: the body ALBEF and BLIP share: ViT, text encoder, projections, `Contrast`,
  ITM head, momentum copies, and the align step (unimodal features and ITC).
- `itm_inputs` -> `ITMBatch`: the ITM batch of ALBEF Sec. 3.2: every positive pair, plus one
  hard-negative text per image and one hard-negative image per text drawn from the gathered batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlp.distributed import all_gather_padded, all_gather_with_grad, gather_sizes, rank
from vlp.losses.itc import dot_similarity, itc_loss, momentum_itc_loss
from vlp.losses.itm import caption_keys, hard_negatives, positive_mask
from vlp.losses.momentum import FeatureQueue, alpha_ramp, ema_update
from vlp.models.recipe import Recipe
from vlp.nn.heads import clamped_scale, itm_head, log_temperature
from vlp.nn.text import TextTransformer
from vlp.nn.tokens import require_tokens
from vlp.nn.vit import VisionTransformer

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class ContrastiveConfig:
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 1000.0  # ALBEF clamps the temperature at 0.001
    momentum: float = 0.995  # EMA coefficient of the momentum encoders; 0 turns them off
    queue_size: int = 65536
    alpha: float = 0.4  # weight of the momentum model's soft targets
    alpha_ramp_steps: int = 1000  # alpha grows linearly over these steps (ALBEF: the first epoch)
    hard_negatives: bool = True  # ITM negatives drawn by ITC similarity; False: uniformly (ablation)


class Momentum(nn.Module):
    """EMA copies of named modules of a model; `update()` after every optimizer step."""

    def __init__(self, modules: dict[str, nn.Module], momentum: float):
        super().__init__()
        self.momentum = momentum
        copies = copy.deepcopy(modules)  # one deepcopy: weights tied across modules stay tied
        self.copies = nn.ModuleDict(copies).requires_grad_(False)
        self._sources = list(modules.items())  # a plain list: the model itself owns these

    @torch.no_grad()
    def update(self) -> None:
        for name, module in self._sources:
            ema_update(module, self.copies[name], self.momentum)

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]


class Contrast(nn.Module):
    """Image-text contrastive loss with optional momentum distillation and feature queues."""

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        self.logit_scale = log_temperature(cfg.init_temperature)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if cfg.momentum and cfg.queue_size:
            self.image_queue = FeatureQueue(cfg.queue_size, cfg.embed_dim)
            self.text_queue = FeatureQueue(cfg.queue_size, cfg.embed_dim)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def alpha(self) -> float:
        return alpha_ramp(self.cfg.alpha, int(self.step), self.cfg.alpha_ramp_steps)

    def forward(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor | None = None,
        text_feat_m: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised features [B, D] -> loss; momentum features switch on distillation."""
        if image_feat_m is None:
            return itc_loss(image_feat, text_feat, self.scale())
        queues = self.cfg.queue_size > 0
        image_keys = torch.cat([image_feat_m, self.image_queue.features]) if queues else image_feat_m
        text_keys = torch.cat([text_feat_m, self.text_queue.features]) if queues else text_feat_m
        loss = momentum_itc_loss(
            image_feat, text_feat, image_feat_m, text_feat_m, image_keys, text_keys, self.scale(), self.alpha()
        )
        if queues and self.training:
            self.image_queue.enqueue(all_gather_with_grad(image_feat_m))
            self.text_queue.enqueue(all_gather_with_grad(text_feat_m))
        return loss


class FusionModel(Recipe):
    """ViT + text encoder aligned by ITC, with an ITM head over their fusion (ALBEF, BLIP).

    Subclasses add their fusion path and objectives; `text_layers` are the text encoder's
    unimodal layers (ALBEF: the bottom part; BLIP: all of them, cross-attention skipped).
    """

    tokenizer_style = "bert"  # [CLS] ... [SEP]
    eval_tasks: tuple[str, ...] = ("zeroshot", "retrieval", "probe")
    required_tokens: tuple[str, ...] = ("pad", "cls", "sep")
    objective_names: tuple[str, ...] = ("itc", "itm")
    text_layers = slice(None)

    def __init__(self, cfg: Any, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        """`cfg` has `vision`, `text`, `contrastive`, `tokens` and `objectives` (ALBEF's, BLIP's)."""
        super().__init__(cfg, tokenizer, run_config)
        vision, text, contrastive, objectives = cfg.vision, cfg.text, cfg.contrastive, cfg.objectives
        require_tokens(cfg.tokens, self.required_tokens)
        if not objectives or set(objectives) - set(self.objective_names):
            raise ValueError(
                f"model.objectives must be a non-empty subset of {list(self.objective_names)}; got {list(objectives)}"
            )
        self.objectives = set(objectives)
        # Training a subset of the objectives (ablations, fine-tuning) leaves weights without
        # gradient, which DDP must be told about.
        self.has_unused_parameters = self.objectives != set(self.objective_names)
        self.visual = VisionTransformer(vision)
        self.text = TextTransformer(text)
        self.image_proj = nn.Linear(vision.width, contrastive.embed_dim)
        self.text_proj = nn.Linear(text.width, contrastive.embed_dim)
        self.itm_head = itm_head(text.width)
        self.contrast = Contrast(contrastive)
        self.momentum: Momentum | None = None

    def _add_momentum(self, **extra: nn.Module) -> None:
        """EMA copies of the unimodal encoders and projections, plus `extra` modules."""
        if self.contrast.cfg.momentum:
            modules = {
                "visual": self.visual,
                "text": self.text,
                "image_proj": self.image_proj,
                "text_proj": self.text_proj,
                **extra,
            }
            self.momentum = Momentum(modules, self.contrast.cfg.momentum)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = self.visual(images)[0]
        return project(self.image_proj, pooled) if normalize else self.image_proj(pooled)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        pooled = self.text(input_ids, attention_mask, layers=self.text_layers)[0]
        return project(self.text_proj, pooled) if normalize else self.text_proj(pooled)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.contrast.scale() * image_emb @ text_emb.T

    def itm_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What `itm_score` takes of an image: the ViT's tokens."""
        return self.visual(images)[1]

    def align(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unimodal pass and ITC: image tokens, text states, features, momentum outputs, loss."""
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        image_pooled, image_tokens = self.visual(images)
        text_pooled, text_states = self.text(ids, mask, layers=self.text_layers)
        out = {
            "image_tokens": image_tokens,
            "text_states": text_states,
            "image_feat": project(self.image_proj, image_pooled),
            "text_feat": project(self.text_proj, text_pooled),
        }
        if self.momentum is not None:
            with torch.no_grad():
                m = self.momentum
                image_pooled_m, out["image_tokens_m"] = m["visual"](images)
                out["image_feat_m"] = project(m["image_proj"], image_pooled_m)
                out["text_feat_m"] = project(m["text_proj"], m["text"](ids, mask, layers=self.text_layers)[0])
        out["itc"] = self.contrast(out["image_feat"], out["text_feat"], out.get("image_feat_m"), out.get("text_feat_m"))
        return out

    def itm_batch(
        self, aligned: dict[str, torch.Tensor], text: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """`itm_inputs` for this batch; `text` is what the recipe's fusion path takes."""
        scale = self.contrast.scale() if self.contrast.cfg.hard_negatives else torch.zeros(())
        return itm_inputs(
            aligned["image_tokens"],
            text,
            batch["attention_mask"],
            batch["input_ids"],
            aligned["image_feat"],
            aligned["text_feat"],
            scale,
        )

    def has_itm(self) -> bool:
        return "itm" in self.objectives

    def scale(self) -> torch.Tensor:
        return self.contrast.scale()

    def after_optimizer_step(self) -> None:
        self.contrast.step += 1
        if self.momentum is not None:
            self.momentum.update()


def project(proj: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
    """Normalised joint-space embedding of a tower's pooled output."""
    return F.normalize(proj(pooled), dim=-1)


class ITMBatch(NamedTuple):
    """Pair i of the ITM batch is image `images[image_rows[i]]` with text `texts[i]`.

    `images` holds each image of the gathered batch once; cross-attention given the rows
    (`context_rows`) projects each image once instead of three times."""

    images: torch.Tensor
    image_rows: torch.Tensor
    texts: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor

    def paired_images(self) -> torch.Tensor:
        """The image of every pair, materialised (for modules that take one image per text)."""
        return self.images[self.image_rows]


def itm_inputs(
    image_tokens: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    input_ids: torch.Tensor,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dot_similarity,
) -> ITMBatch:
    """The ITM batch: B positives, then B images with a hard-negative text, then B texts with
    a hard-negative image (ALBEF Sec. 3.2).

    `text` is what the fusion encoder takes (BLIP: token ids; ALBEF: the text encoder's states);
    negatives come from all ranks, sampled without gradient by ITC similarity (a zero
    `logit_scale` makes the draw uniform); captions identical to the positive one (by
    `input_ids`) are never drawn. `similarity` as in `itc_loss` (BLIP-2: the best query).
    """
    sizes = gather_sizes(image_feat.shape[0], image_feat.device)
    with torch.no_grad():
        all_image_feat, all_text_feat = all_gather_with_grad(image_feat, sizes), all_gather_with_grad(text_feat, sizes)
        keys = caption_keys(input_ids, text_mask)
        positive = positive_mask(keys, all_gather_with_grad(keys, sizes), sum(sizes[: rank()]))
        scale = logit_scale.detach()
        neg_text, neg_image = hard_negatives(
            scale * similarity(image_feat, all_text_feat), scale * similarity(all_image_feat, text_feat).T, positive
        )
    all_images = all_gather_with_grad(image_tokens, sizes)
    all_text, all_mask = all_gather_padded(text), all_gather_padded(text_mask)
    length = all_text.shape[1]
    text, text_mask = _pad_to(text, length), _pad_to(text_mask, length)
    batch = image_tokens.shape[0]
    own = torch.arange(batch, device=image_tokens.device) + sum(sizes[: rank()])
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    return ITMBatch(
        images=all_images,
        image_rows=torch.cat([own, own, neg_image]),
        texts=torch.cat([text, all_text[neg_text], text]),
        masks=torch.cat([text_mask, all_mask[neg_text], text_mask]),
        labels=labels.to(image_tokens.device),
    )


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros (padding ids and masks are 0) to `length`."""
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]])
