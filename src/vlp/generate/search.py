"""Decoding strategies over a `Decoder`: greedy, beam search and nucleus sampling, batched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

METHODS = ("greedy", "beam", "nucleus")


class Decoder(Protocol):
    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """New tokens [N, t] -> (logits [N, V] for the last position, new state)."""

    def reorder(self, state: Any, index: torch.Tensor, same_context: bool = False) -> Any:
        """The state of batch rows `index` (rows may repeat). `same_context`: every row moves
        among rows with the same context (the beams of one caption), so the context and its
        cross-attention keys/values stay where they are."""


class Recomputing:
    """A `Decoder` without any cache: each step runs `logits(prefix, context) -> [N, V]` on the
    whole prefix so far. The reference cached decoders are tested and benchmarked against."""

    def __init__(self, logits: Callable[[torch.Tensor, Any], torch.Tensor]):
        self.logits = logits

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        prefix, context = state
        prefix = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        return self.logits(prefix, context), (prefix, context)

    def reorder(self, state: tuple, index: torch.Tensor, same_context: bool = False) -> tuple:
        prefix, context = state
        return prefix.index_select(0, index), context if same_context else context.index_select(0, index)


def adjust_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    generated: int,
    min_new_tokens: int,
    eos_id: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """Repetition penalty (CTRL, Keskar et al. 2019: logits of tokens already in the sequence
    are divided by the penalty when positive, multiplied when negative) and the minimum length
    (no end-of-sequence before `min_new_tokens`)."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0:
        seen = logits.gather(1, tokens)
        logits.scatter_(1, tokens, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if generated < min_new_tokens:
        logits[:, eos_id] = float("-inf")
    return logits


def _sample(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    state: Any,
    choose: Callable,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_id: int,
    pad_id: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """One token per row per step, chosen by `choose(logits)`; rows stop at end-of-sequence."""
    tokens = prompt_ids
    done = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
    logits, state = decoder.step(prompt_ids, state)
    for generated in range(max_new_tokens):
        logits = adjust_logits(logits, tokens, generated, min_new_tokens, eos_id, repetition_penalty)
        next_token = torch.where(done, pad_id, choose(logits))
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= next_token == eos_id
        if done.all() or generated == max_new_tokens - 1:
            break
        logits, state = decoder.step(next_token[:, None], state)
    return tokens


@torch.no_grad()
def greedy(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    state: Any,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """The most likely token at every step. Returns [B, P + T], padded after end-of-sequence."""
    return _sample(
        decoder,
        prompt_ids,
        state,
        lambda logits: logits.argmax(dim=-1),
        max_new_tokens,
        min_new_tokens,
        eos_id,
        pad_id,
        repetition_penalty,
    )


def top_p_filter(logits: torch.Tensor, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`
    (Holtzman et al. 2020, Sec. 3.1), and at most `top_k` of them when top_k > 0."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already suffices
    if top_k > 0:
        outside[:, top_k:] = True
    outside[:, 0] = False
    filtered = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, filtered)


@torch.no_grad()
def nucleus(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    state: Any,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nucleus (top-p) sampling at a temperature; reproducible with a seeded `generator`."""

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = top_p_filter(logits / temperature, top_p, top_k).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _sample(
        decoder, prompt_ids, state, choose, max_new_tokens, min_new_tokens, eos_id, pad_id, repetition_penalty
    )


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    state: Any,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    num_beams: int = 3,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Beam search: the best of `num_beams` hypotheses per row by sum of log-probabilities /
    length ** length_penalty (length counts generated tokens, end-of-sequence included).

    A row stops once it holds `num_beams` finished hypotheses; at `max_new_tokens` the live
    beams are finished as they are. The prompt is decoded once per row, then its state is
    repeated for the beams, which from then on only move among the beams of their row.
    """
    batch, beams, device = prompt_ids.shape[0], num_beams, prompt_ids.device
    logits, state = decoder.step(prompt_ids, state)
    rows = torch.arange(batch, device=device).repeat_interleave(beams)
    tokens, logits, state = prompt_ids[rows], logits[rows], decoder.reorder(state, rows)
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    for generated in range(max_new_tokens):
        logp = adjust_logits(logits, tokens, generated, min_new_tokens, eos_id, repetition_penalty)
        logp = logp.log_softmax(dim=-1)
        vocab = logp.shape[-1]
        top, index = (scores.view(-1, 1) + logp).view(batch, -1).topk(2 * beams, dim=1)
        source, token = index // vocab, index % vocab
        is_eos = token == eos_id
        for b, k in (is_eos[:, :beams]).nonzero().tolist():  # eos among the best: finished
            if len(finished[b]) < beams:
                sequence = torch.cat([tokens[b * beams + source[b, k]], token[b, k, None]])
                finished[b].append((float(top[b, k]) / (generated + 1) ** length_penalty, sequence))
        live = top.masked_fill(is_eos, float("-inf")).topk(beams, dim=1).indices
        scores = top.gather(1, live)
        chosen = (source.gather(1, live) + torch.arange(batch, device=device)[:, None] * beams).view(-1)
        tokens = torch.cat([tokens[chosen], token.gather(1, live).view(-1, 1)], dim=1)
        if all(len(f) >= beams for f in finished) or generated == max_new_tokens - 1:
            break
        state = decoder.reorder(state, chosen, same_context=True)
        logits, state = decoder.step(tokens[:, -1:], state)
    for b in range(batch):
        if len(finished[b]) < beams:
            length = tokens.shape[1] - prompt_ids.shape[1]
            finished[b] += [
                (float(s) / length**length_penalty, tokens[b * beams + k])
                for k, s in enumerate(scores[b].tolist())
                if s > float("-inf")
            ]
    best = [max(f, key=lambda hyp: hyp[0])[1] for f in finished]
    out = torch.full((batch, max(len(s) for s in best)), pad_id, dtype=torch.long, device=device)
    for b, sequence in enumerate(best):
        out[b, : len(sequence)] = sequence
    return out


def generate(
    decoder: Decoder,
    prompt_ids: torch.Tensor,
    state: Any = None,
    method: str = "greedy",
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    eos_id: int = 3,
    pad_id: int = 0,
    **options: Any,
) -> torch.Tensor:
    """Validate the options, then run one decoding method (`greedy`, `beam` or `nucleus`)."""
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose from {list(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be between 0 and max_new_tokens ({max_new_tokens}), got {min_new_tokens}"
        )
    if options.get("num_beams", 1) < 1:
        raise ValueError(f"num_beams must be at least 1, got {options['num_beams']}")
    if not 0 < options.get("top_p", 1.0) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {options['top_p']}")
    if options.get("temperature", 1.0) <= 0:
        raise ValueError(f"temperature must be positive, got {options['temperature']}")
    if options.get("repetition_penalty", 1.0) <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {options['repetition_penalty']}")
    allowed = {
        "greedy": {"repetition_penalty"},
        "beam": {"repetition_penalty", "num_beams", "length_penalty"},
        "nucleus": {"repetition_penalty", "top_p", "top_k", "temperature", "generator"},
    }[method]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"option(s) {sorted(unknown)} do not apply to {method!r} decoding (it takes {sorted(allowed)})"
        )
    search = {"greedy": greedy, "beam": beam_search, "nucleus": nucleus}[method]
    return search(
        decoder,
        prompt_ids,
        state,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        **options,
    )
