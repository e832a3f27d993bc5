"""Decoding: KV cache vs. full recomputation, beam vs. greedy, stopping rules, penalties."""

import math

import pytest
import torch
from torch import nn

import vlp
from vlp.generate import Recomputing, beam_search, generate, greedy, nucleus
from vlp.nn.attention import KVCache
from vlp.nn.text import TextConfig, TextTransformer

EOS, PAD, VOCAB = 3, 0, 20


class ToyLM(nn.Module):
    """A tiny causal decoder cross-attending to a context, with random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = TextTransformer(
            TextConfig(
                vocab_size=VOCAB, context_length=40, width=32, layers=2, heads=2, cross_attention_every=1, context_dim=8
            )
        )
        self.head = nn.Linear(32, VOCAB)

    def logits(self, tokens, context, cache=None):
        return self.head(self.text(tokens, torch.ones_like(tokens), context=context, cache=cache)[1][:, -1])


class Cached:
    def __init__(self, lm):
        self.lm = lm

    def step(self, tokens, state):
        cache, context = state
        return self.lm.logits(tokens, context, cache), state

    def reorder(self, state, index, same_context=False):
        return state[0].reorder(index, context=not same_context), state[1] if same_context else state[1][index]


def inputs(batch=3):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(4, VOCAB, (batch, 2), generator=gen), torch.randn(batch, 5, 8, generator=gen)


@pytest.mark.parametrize(
    "method, options", [("greedy", {}), ("beam", {"num_beams": 3}), ("nucleus", {"top_p": 0.9, "temperature": 1.5})]
)
def test_kv_cache_equals_recomputation(method, options):
    lm, (prompt, context) = ToyLM().eval(), inputs()
    seeded = lambda: {"generator": torch.Generator().manual_seed(7)} if method == "nucleus" else {}  # noqa: E731
    cached = generate(
        Cached(lm),
        prompt,
        (KVCache(), context),
        method,
        max_new_tokens=12,
        eos_id=EOS,
        pad_id=PAD,
        **options,
        **seeded(),
    )
    reference = generate(
        Recomputing(lm.logits),
        prompt,
        (None, context),
        method,
        max_new_tokens=12,
        eos_id=EOS,
        pad_id=PAD,
        **options,
        **seeded(),
    )
    assert torch.equal(cached, reference)
    assert cached.shape[1] > prompt.shape[1] + 3


def test_beam_one_equals_greedy_and_batching_changes_nothing():
    lm, (prompt, context) = ToyLM().eval(), inputs()
    args = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD)
    a = greedy(Cached(lm), prompt, (KVCache(), context), **args)
    b = beam_search(Cached(lm), prompt, (KVCache(), context), num_beams=1, **args)
    assert torch.equal(a, b)
    for row in range(3):
        alone = greedy(Cached(lm), prompt[row : row + 1], (KVCache(), context[row : row + 1]), **args)
        assert torch.equal(alone[0], a[row, : alone.shape[1]])


class Table:
    """A Markov decoder: the next-token distribution depends on the last token only."""

    def __init__(self, table):
        self.table = torch.log(torch.tensor(table))

    def step(self, tokens, state):
        return self.table[tokens[:, -1]], state

    def reorder(self, state, index, same_context=False):
        return state


def test_beam_finds_the_sequence_greedy_misses():
    # From token 0: A (1) has p 0.6 but then only flat continuations; B (2) has 0.4, then eos (3) for sure.
    rows = [[0.0, 0.6, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    rows[1] = [0.3, 0.35, 0.35, 0.0]  # after A: nothing likely, no eos
    eps = 1e-9
    table = Table([[max(p, eps) for p in row] for row in rows])
    start = torch.zeros(1, 1, dtype=torch.long)
    args = dict(max_new_tokens=2, eos_id=3, pad_id=0)
    g = greedy(table, start, None, **args)
    b = beam_search(table, start, None, num_beams=2, length_penalty=0.0, **args)
    assert g[0, 1] == 1 and b[0].tolist() == [0, 2, 3]
    logp = lambda seq: sum(float(table.table[a, c]) for a, c in zip(seq[:-1], seq[1:]))  # noqa: E731
    assert logp(b[0].tolist()) > logp(g[0].tolist())
    assert math.isclose(logp(b[0].tolist()), math.log(0.4), rel_tol=1e-6)


def test_eos_padding_and_length_limits():
    always_eos = Table([[1e-9, 1e-9, 1e-9, 1.0]] * 4)
    start = torch.tensor([[1], [2]])
    out = greedy(always_eos, start, None, max_new_tokens=5, eos_id=3, pad_id=0)
    assert out.tolist() == [[1, 3], [2, 3]]
    longer = greedy(always_eos, start, None, max_new_tokens=5, min_new_tokens=3, eos_id=3, pad_id=0)
    assert longer.shape[1] == 1 + 4 and (longer[:, 1:4] != 3).all() and (longer[:, 4] == 3).all()
    never_eos = Table([[0.1, 0.5, 0.4, 1e-9]] * 4)
    assert greedy(never_eos, start, None, max_new_tokens=4, eos_id=3, pad_id=0).shape[1] == 5
    assert beam_search(never_eos, start, None, max_new_tokens=4, eos_id=3, pad_id=0).shape[1] == 5
    mixed = Table([[0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.7, 0.1], [1e-9, 1e-9, 1e-9, 1.0], [0.1, 0.1, 0.7, 0.1]])
    out = greedy(mixed, torch.tensor([[2], [0]]), None, max_new_tokens=4, eos_id=3, pad_id=0)
    assert out.tolist() == [[2, 3, 0], [0, 2, 3]]  # the first row is padded after its eos


def test_repetition_penalty_and_nucleus_limits():
    repeat = Table([[0.1, 0.1, 0.45, 0.35]] * 4)
    start = torch.tensor([[2]])
    assert greedy(repeat, start, None, max_new_tokens=1, eos_id=9, pad_id=0)[0, 1] == 2
    penalised = greedy(repeat, start, None, max_new_tokens=1, eos_id=9, pad_id=0, repetition_penalty=2.0)
    assert penalised[0, 1] == 3  # log 0.45 * 2 < log 0.35: the seen token loses
    lm, (prompt, context) = ToyLM().eval(), inputs()
    args = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD)
    tight = nucleus(Cached(lm), prompt, (KVCache(), context), top_p=1e-6, **args)
    assert torch.equal(tight, greedy(Cached(lm), prompt, (KVCache(), context), **args))
    draws = [
        nucleus(
            Cached(lm),
            prompt,
            (KVCache(), context),
            temperature=2.0,
            generator=torch.Generator().manual_seed(s),
            **args,
        )
        for s in (0, 0, 1)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "top"}, "unknown decoding method"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 5}, "min_new_tokens"),
        ({"method": "beam", "num_beams": 0}, "num_beams"),
        ({"method": "nucleus", "top_p": 1.5}, "top_p"),
        ({"method": "nucleus", "temperature": 0}, "temperature"),
        ({"num_beams": 3}, "do not apply"),
    ],
)
def test_option_errors_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        generate(Table([[0.5, 0.5]] * 2), torch.zeros(1, 1, dtype=torch.long), None, **options)


def test_blip_generation_matches_its_full_forward():
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_fusion_models import model_config

    torch.manual_seed(0)
    model = vlp.create_model("blip", model_config("blip")).eval()
    images = torch.randn(2, 3, 32, 32)
    out = model.generate(images, method="greedy", max_new_tokens=6, min_new_tokens=6)
    image_tokens = model.visual(images)[1]
    for t in range(1, out.shape[1]):  # each token is the argmax of a cache-free full pass
        logits = model.caption_logits(image_tokens, out[:, :t], torch.ones_like(out[:, :t]))[:, -1]
        logits[:, model.cfg.tokens["sep"]] = float("-inf")
        assert torch.equal(logits.argmax(-1), out[:, t])


def test_blip_beam_search_equals_recomputing():
    """Beams decode the prompt once per image and never move the image's keys/values (they only
    move among the beams of one image): same captions as a cache-free search."""
    from tests.test_fusion_models import model_config

    torch.manual_seed(0)
    model = vlp.create_model("blip", model_config("blip")).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = model.cfg.tokens
    cached = model.generate(images, method="beam", num_beams=3, max_new_tokens=8)
    with torch.no_grad():
        decoder = Recomputing(
            lambda prefix, context: model.caption_logits(context, prefix, torch.ones_like(prefix))[:, -1]
        )
        start = torch.full((3, 1), tokens["dec"])
        reference = beam_search(
            decoder,
            start,
            (None, model.visual(images)[1]),
            num_beams=3,
            max_new_tokens=8,
            eos_id=tokens["sep"],
            pad_id=tokens["pad"],
        )
    assert torch.equal(cached, reference)
