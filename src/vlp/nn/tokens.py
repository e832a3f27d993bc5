"""What the recipes check and budget of their text tokens: the special ids they need from the
run's tokenizer, and the room a prompt leaves in the context for generated tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def require_tokens(tokens: Mapping[str, int], required: Iterable[str]) -> None:
    """Fail early, naming them, when `model.tokens` (filled from the tokenizer when the model is
    built) lacks a special id the recipe uses, rather than at the first batch."""
    missing = set(required) - set(tokens)
    if missing:
        raise ValueError(f"model.tokens lacks the ids of {sorted(missing)} (the tokenizer's)")


def cap_new_tokens(options: dict[str, Any], context_length: int, prompt_length: int) -> dict[str, Any]:
    """Decoding `options` (as `vlp.generate.generate`) with `max_new_tokens` (default 20) capped
    at the room the prompt leaves in the text context (the position embeddings end there), and
    `min_new_tokens` (default 0) at that maximum."""
    max_new_tokens = min(options.get("max_new_tokens", 20), context_length - prompt_length)
    return {
        **options,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min(options.get("min_new_tokens", 0), max_new_tokens),
    }
