"""Losses of the fusion recipes: ITM hard negatives, MLM masking, LM, momentum distillation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import itc_loss, momentum_itc_loss
from vlp.losses.itm import caption_keys, hard_negatives, positive_mask
from vlp.losses.lm import lm_loss
from vlp.losses.mlm import mask_tokens, mlm_loss
from vlp.losses.momentum import FeatureQueue, alpha_ramp, ema_update


def test_hard_negatives_skip_positives_and_duplicates():
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3], [2, 10, 11, 3], [2, 14, 3, 0], [2, 15, 3, 0]])
    mask = (ids > 0).long()
    keys = caption_keys(ids, mask)
    assert keys[0] == keys[2] and len(set(keys.tolist())) == 4
    positive = positive_mask(keys, keys, offset=0)
    sim = torch.randn(5, 5) * 5
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        neg_text, neg_image = hard_negatives(sim, sim.T.contiguous(), positive, gen)
        assert not positive[torch.arange(5), neg_text].any()
        assert not positive[torch.arange(5), neg_image].any()
        assert neg_text[0] != 2 and neg_text[2] != 0  # identical captions are never negatives


def test_hard_negatives_follow_the_softmax():
    sim = torch.tensor([[5.0, 3.0, 1.0, 0.0, -2.0]])
    positive = torch.tensor([[True, False, False, False, False]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(sim, sim, positive, gen)[0] for _ in range(4000)]).squeeze(1)
    counts = torch.bincount(draws, minlength=5).float() / 4000
    expected = torch.softmax(torch.tensor([3.0, 1.0, 0.0, -2.0]), 0)
    assert counts[0] == 0
    assert torch.allclose(counts[1:], expected, atol=0.03)  # ~4 standard errors
    assert counts[1] > 5 * counts[3]  # the most similar negative dominates


def test_hard_negatives_need_a_different_caption():
    positive = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="identical"):
        hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), positive)


def test_mask_tokens_proportions():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (64, 128), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    ids[:, 100:] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=500, special_ids=[0, 2, 3], generator=gen)
    chosen = labels != -100
    candidates = mask.bool() & (ids > 3)
    assert not (chosen & ~candidates).any()  # never pads, [CLS] or [SEP]
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    n = chosen.sum()
    as_mask = (masked == 4) & chosen
    kept = (masked == ids) & chosen
    randomised = chosen & ~as_mask & ~kept
    assert abs(as_mask.sum() / n - 0.8) < 0.02 and abs(kept.sum() / n - 0.1) < 0.02
    assert abs(randomised.sum() / n - 0.1) < 0.02
    assert (masked[randomised] > 4).all()  # random replacements are never special tokens
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


def test_mlm_loss_soft_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 2
    soft = torch.softmax(torch.randn(2, 5, 7), -1)
    hard = F.cross_entropy(torch.stack([logits[0, 1], logits[1, 3]]), torch.tensor([4, 2]))
    assert torch.allclose(mlm_loss(logits, labels), hard)
    assert torch.allclose(mlm_loss(logits, labels, soft, alpha=0.0), hard)
    soft_only = (
        -(torch.stack([soft[0, 1], soft[1, 3]]) * torch.log_softmax(torch.stack([logits[0, 1], logits[1, 3]]), -1))
        .sum(-1)
        .mean()
    )
    assert torch.allclose(mlm_loss(logits, labels, soft, alpha=1.0), soft_only)
    assert torch.allclose(mlm_loss(logits, labels, soft, alpha=0.4), 0.6 * hard + 0.4 * soft_only)


def test_lm_loss_equals_reference_and_skips_prompt_and_padding():
    torch.manual_seed(0)
    vocab, eps = 11, 0.1
    logits = torch.randn(2, 6, vocab, requires_grad=True)
    ids = torch.randint(5, vocab, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    prompt = 2  # start token + one prompt token: targets from position 2 on
    terms = []
    for b, t in [(0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (1, 3)]:
        logp = torch.log_softmax(logits[b, t - 1], -1)
        terms.append((1 - eps) * -logp[ids[b, t]] + eps * -logp.mean())
    reference = torch.stack(terms).mean()
    loss = lm_loss(logits, ids, mask, prompt_length=prompt, label_smoothing=eps)
    assert torch.allclose(loss, reference)
    loss.backward()
    assert logits.grad[:, 0].abs().sum() == 0  # predicts the prompt token: not scored
    assert logits.grad[1, 3:].abs().sum() == 0  # predicts padding: not scored
    assert logits.grad[0, 1].abs().sum() > 0


def test_ema_update_formula():
    torch.manual_seed(0)
    model, momentum_model = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in momentum_model.parameters()]
    ema_update(model, momentum_model, 0.9)
    for p, p_m, old in zip(model.parameters(), momentum_model.parameters(), before):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p.detach(), rtol=0, atol=1e-7)
    assert alpha_ramp(0.4, 50, 100) == pytest.approx(0.2) and alpha_ramp(0.4, 500, 100) == 0.4


def test_queue_wraps_around():
    queue = FeatureQueue(8, 2)
    batches = [torch.full((3, 2), float(k)) for k in range(4)]
    for batch in batches:
        queue.enqueue(batch)
    # Writes: rows 0-2 <- 0, 3-5 <- 1, 6,7,0 <- 2, 1-3 <- 3.
    assert queue.features[:, 0].tolist() == [2, 3, 3, 3, 1, 1, 2, 2] and int(queue.ptr) == 4
    queue.enqueue(torch.arange(20.0).view(10, 2))  # larger than the queue: the last 8 rows stay
    assert sorted(queue.features[:, 0].tolist()) == list(range(4, 20, 2))


def test_momentum_itc_without_distillation_is_plain_contrast():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    scale = torch.tensor(10.0)
    plain = itc_loss(image, text, scale)
    assert torch.allclose(momentum_itc_loss(image, text, image, text, image, text, scale, 0.0), plain)


def test_momentum_itc_gradient_float64():
    torch.manual_seed(0)
    feats = [F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1) for _ in range(4)]
    queue = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    image_m, text_m = feats[2], feats[3]
    image_keys, text_keys = torch.cat([image_m, queue]), torch.cat([text_m, queue])

    def loss(image, text):
        return momentum_itc_loss(
            image, text, image_m, text_m, image_keys, text_keys, torch.tensor(5.0, dtype=torch.float64), 0.4
        )

    image, text = (f.clone().requires_grad_() for f in feats[:2])
    assert torch.autograd.gradcheck(loss, (image, text))
    assert math.isfinite(loss(image, text).item())
