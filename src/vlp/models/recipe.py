"""What a recipe is: one paper's model, and everything the rest of vlp may use of it.

The trainer, the evaluation, the applications and interop see a model only through `Recipe`.
Each capability is declared here with its default, and a recipe overrides what it has, so
nothing outside `vlp.models` asks a model `hasattr(...)` (docs/design.md, "The recipe protocol").
A model gets its tokenizer and its run config when it is built (`vlp.models.build_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlp.config import RunConfig
from vlp.losses.itc import dot_similarity

if TYPE_CHECKING:
    from vlp.data.tokenizer import Tokenizer


class Recipe(nn.Module):
    """Base class of every recipe's model.

    Required of every recipe: `forward(batch) -> {loss name: scalar}` (the trainer sums them
    with `train.loss_weights`). Recipes that align images and texts also give
    `encode_image` / `encode_text` (normalised embeddings); the rest is optional, declared below.
    """

    recipe: ClassVar[str] = ""  # the registry name, set by @register
    tokenizer_style: ClassVar[str] = "bert"  # "bert": [CLS] text [SEP]; "clip": <|startoftext|> text <|endoftext|>
    text_section: ClassVar[str] = "text"  # the config section whose vocab_size follows the tokenizer
    writes_own_hf: ClassVar[bool] = False  # save_hf() writes its transformers directory itself
    can_caption: ClassVar[bool] = False  # caption() works: the recipe has a text decoder
    eval_tasks: tuple[str, ...] = ()  # what `vlp eval` runs by default (see vlp.eval.run.TASKS)
    # Some parameters get no gradient (objectives left out, a stream unused): DDP must be told.
    has_unused_parameters: bool = False

    def __init__(self, cfg: Any, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # the run's text tokenizer (None: a checkpoint without one)
        self.run_config = run_config  # the run it was trained in (None: built from a model config alone)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.pair_loss_only:
            return self.pair_losses(*self.embed_pair(batch))
        raise NotImplementedError(f"recipe {self.recipe!r} has no forward")

    # --- shapes and text -------------------------------------------------------------------------

    def text_config(self) -> Any:
        """The config of the text tower (`cfg.text`, or the section `text_section` names)."""
        return getattr(self.cfg, self.text_section)

    def image_size(self) -> int | None:
        """The side of the square images the model reads; None for text-only recipes."""
        return self.cfg.vision.image_size

    # --- training --------------------------------------------------------------------------------

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every update (momentum encoders follow the model here)."""

    # Recipes whose training loss depends on a batch only through its image and text embeddings
    # (CLIP, SigLIP) set this and give `pair_losses` (`forward` and `embed_pair` follow): with
    # `train.accum` > 1 the trainer then scores every micro-batch against all the others'
    # negatives (docs/scale.md).
    pair_loss_only: ClassVar[bool] = False

    def embed_pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (image, text) embeddings `forward` computes its losses from."""
        return self.encode_image(batch["images"]), self.encode_text(batch["input_ids"], batch["attention_mask"])

    def pair_losses(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward`'s losses from the embeddings of `embed_pair`."""
        raise NotImplementedError(f"recipe {self.recipe!r} has other losses than its embeddings'")

    # --- alignment: retrieval, zero-shot, ITM re-ranking ---------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"recipe {self.recipe!r} has no image embedding")

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"recipe {self.recipe!r} has no text embedding")

    def scale(self) -> torch.Tensor:
        """The contrastive head's learned logit scale (1 / temperature): similarities times it
        are the logits its softmax was trained on (zero-shot probabilities)."""
        raise NotImplementedError(f"recipe {self.recipe!r} has no contrastive head")

    def embedding_similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """[N, M] scores of image embeddings against text embeddings (default: dot product)."""
        return dot_similarity(image_emb, text_emb)

    def label_probabilities(self, image_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """[N, L] probability of each label for each image (zero-shot classification): a
        softmax over the labels of the scaled similarities (CLIP Sec. 3.1.4)."""
        return (self.scale() * self.embedding_similarity(image_emb, label_emb)).softmax(dim=-1)

    def has_itm(self) -> bool:
        """Whether `itm_score` is a trained image-text matching head."""
        return False

    def itm_score(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError(f"recipe {self.recipe!r} has no ITM head")

    # --- text generation -------------------------------------------------------------------------

    def generate(
        self, images: torch.Tensor, prompt_ids: torch.Tensor | None = None, method: str = "beam", **options: Any
    ) -> torch.Tensor:
        """Token ids [B, T] starting with the start token and `prompt_ids` (see vlp.generate)."""
        raise NotImplementedError(f"recipe {self.recipe!r} has no text decoder")

    def caption(
        self, images: torch.Tensor, prompt: str | None = None, method: str = "beam", **options: Any
    ) -> list[str]:
        """Captions of a batch of (eval-transformed) images, as text without the prompt.

        `prompt` defaults to the one the model was trained with (`data.prompt`, e.g. "a picture
        of "); decoding options as `vlp.generate.generate` (num_beams, max_new_tokens, top_p, ...).
        """
        if not self.can_caption:
            raise TypeError(f"recipe {self.recipe!r} has no text decoder")
        if prompt is None:
            prompt = self.run_config.data.prompt if self.run_config is not None else ""
        prompt_ids = None
        if prompt.strip():
            prompt_ids = self.tokenizer(prompt, style=self.tokenizer_style)["input_ids"][:, 1:-1].to(images.device)
        ids = self.generate(images, prompt_ids, method=method, **options)
        start = 1 + (0 if prompt_ids is None else prompt_ids.shape[1])
        return [text.strip() for text in self.tokenizer.batch_decode(ids[:, start:])]

    def answer_texts(self, images: torch.Tensor, questions: list[str]) -> list[str]:
        """An answer to each question about its image (recipes with "vqa" in `eval_tasks`)."""
        raise TypeError(f"recipe {self.recipe!r} does not answer questions")

    # --- saving ----------------------------------------------------------------------------------

    def save_files(self, out: Path) -> None:
        """Write what a saved run needs beside its weights and tokenizer (BLIP-2 stage 2: its
        frozen LM, kept outside the state dict)."""

    def save_hf(self, out: Path) -> Path:
        """Write a transformers directory (recipes with `writes_own_hf`; others go through
        vlp.interop)."""
        raise NotImplementedError(f"recipe {self.recipe!r} is saved for transformers by vlp.interop")
