"""Edge cases of the fusion losses beyond tests/test_losses_vl.py: hard negatives across ranks
and with broken similarities, masking corner cases, per-caption prompts, soft ITC targets."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import momentum_itc_loss, soft_cross_entropy
from vlp.losses.itm import caption_keys, hard_negatives, positive_mask
from vlp.losses.lm import lm_loss
from vlp.losses.mlm import mask_tokens, mlm_loss
from vlp.losses.momentum import ema_update, soft_itc_targets


def test_hard_negatives_on_one_rank_of_a_global_batch():
    # Global batch of 6 captions; this rank holds items 2-4 (offset 2). Caption 3 == caption 0.
    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0], [2, 5, 6, 3], [2, 7, 8, 3], [2, 7, 3, 0], [2, 8, 7, 3]])
    keys = caption_keys(ids, (ids > 0).long())
    positive = positive_mask(keys[2:5], keys, offset=2)
    assert positive.nonzero().tolist() == [[0, 2], [1, 0], [1, 3], [2, 4]]
    sim = torch.zeros(3, 6)
    sim[1, 0] = 50.0  # the duplicate is by far the most similar: it must still never be drawn
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(3).repeat(500)
    neg_text, neg_image = hard_negatives(sim[rows], sim[rows], positive[rows], gen)
    assert not positive[rows, neg_text].any() and not positive[rows, neg_image].any()
    assert set(neg_text[rows == 1].tolist()) == {1, 2, 4, 5}  # all other items do come up


def test_broken_similarity_rows_fall_back_to_uniform():
    sim = torch.zeros(3000, 4)
    sim[0::3, 2] = float("nan")
    sim[1::3, 1:] = float("-inf")  # every non-positive impossible under softmax
    sim[2::3, 3] = float("inf")
    positive = torch.zeros(3000, 4, dtype=torch.bool)
    positive[:, 0] = True
    gen = torch.Generator().manual_seed(2)
    neg_text, _ = hard_negatives(sim, sim, positive, gen)
    for kind in range(3):
        freq = torch.bincount(neg_text[kind::3], minlength=4).float() / 1000
        assert freq[0] == 0 and torch.allclose(freq[1:], torch.full((3,), 1 / 3), atol=0.06)


def test_mask_tokens_without_special_ids_and_out_of_vocab_specials():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (32, 64), generator=gen)
    mask = torch.ones_like(ids)
    masked, labels = mask_tokens(ids, mask, mask_id=39, vocab_size=40, special_ids=[], generator=gen)
    assert abs((labels != -100).float().mean() - 0.15) < 0.02
    masked, labels = mask_tokens(ids, mask, mask_id=39, vocab_size=40, special_ids=[0, 1, 500], prob=0.5, generator=gen)
    chosen = labels != -100
    assert not chosen[ids < 2].any()
    replaced = chosen & (masked != 39) & (masked != ids)
    assert replaced.sum() > 0 and (masked[replaced] >= 2).all() and (masked[replaced] < 39).all()


def test_mlm_loss_with_nothing_masked_is_a_differentiable_zero():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None and logits.grad.abs().sum() == 0


def test_lm_loss_ignores_prompt_and_padding_targets():
    torch.manual_seed(0)
    vocab, eps = 13, 0.1
    logits = torch.randn(3, 7, vocab)
    ids = torch.randint(4, vocab, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3])
    prompt = torch.tensor([3, 1, 2])  # one per caption
    loss = lm_loss(logits, ids, mask, prompt_length=prompt, label_smoothing=eps)
    terms = []
    for b in range(3):
        for t in range(int(prompt[b]), int(mask[b].sum())):
            logp = torch.log_softmax(logits[b, t - 1], -1)
            terms.append((1 - eps) * -logp[ids[b, t]] + eps * -logp.mean())
    assert torch.allclose(loss, torch.stack(terms).mean())
    changed = logits.clone()
    changed[0, :2] += 5 * torch.randn(2, vocab)  # predict prompt tokens of caption 0
    changed[1, 4:] += 5 * torch.randn(3, vocab)  # predict padding of caption 1
    changed[2, 0] += 5 * torch.randn(vocab)  # predicts the prompt token of caption 2
    assert torch.equal(lm_loss(changed, ids, mask, prompt, eps), loss)
    changed[2, 1] += 5 * torch.randn(vocab)  # predicts the first caption token: scored
    assert not torch.allclose(lm_loss(changed, ids, mask, prompt, eps), loss)
    same_prompt = lm_loss(logits, ids, mask, prompt_length=2, label_smoothing=eps)
    assert torch.allclose(same_prompt, lm_loss(logits, ids, mask, torch.tensor([2, 2, 2]), eps))


def test_ema_update_rejects_mismatched_models():
    torch.manual_seed(0)
    model, copy = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    old = [p.clone() for p in copy.parameters()]
    ema_update(model, copy, 0.75)
    for p, p_m, before in zip(model.parameters(), copy.parameters(), old):
        assert torch.equal(p_m, 0.75 * before + 0.25 * p.detach())
    with pytest.raises(ValueError):
        ema_update(model, nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="mirror"):
        ema_update(model, nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)), 0.9)


def test_soft_itc_targets():
    sim = torch.randn(3, 5)
    positive = torch.zeros(3, 5, dtype=torch.bool)
    positive[0, 0] = positive[1, 1] = positive[2, 2] = positive[2, 4] = True  # item 4 duplicates 2
    targets = soft_itc_targets(sim, positive, alpha=0.0)
    assert torch.equal(targets[2], torch.tensor([0, 0, 0.5, 0, 0.5]))
    assert torch.allclose(soft_itc_targets(sim, positive, 0.3).sum(1), torch.ones(3))
    assert torch.allclose(soft_itc_targets(sim, positive, 1.0), sim.softmax(1))
    labels = torch.arange(3)
    one_hot = soft_itc_targets(sim, F.one_hot(labels, 5).bool(), alpha=0.0)
    assert torch.allclose(soft_cross_entropy(sim, one_hot), F.cross_entropy(sim, labels))
    with pytest.raises(ValueError, match="positive"):
        soft_itc_targets(sim, torch.zeros(3, 5, dtype=torch.bool), 0.4)


def test_soft_cross_entropy_gradcheck_and_momentum_itc_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    positive = torch.rand(4, 6) < 0.4
    positive[:, 0] = True
    targets = soft_itc_targets(torch.randn(4, 6, dtype=torch.float64), positive, 0.4)
    assert torch.autograd.gradcheck(lambda x: soft_cross_entropy(x, targets), (logits,))
    image, text, image_m, text_m, queue = (F.normalize(torch.randn(n, 3), dim=1) for n in (4, 4, 4, 4, 5))
    scale, alpha = torch.tensor(7.0), 0.4
    image_keys, text_keys = torch.cat([image_m, queue]), torch.cat([text_m, queue])
    y = torch.cat([torch.eye(4), torch.zeros(4, 5)], dim=1)
    reference = 0
    for q, q_m, keys in ((image, image_m, text_keys), (text, text_m, image_keys)):
        target = alpha * (scale * q_m @ keys.T).softmax(1) + (1 - alpha) * y
        reference = reference + -(target * (scale * q @ keys.T).log_softmax(1)).sum(1).mean() / 2
    loss = momentum_itc_loss(image, text, image_m, text_m, image_keys, text_keys, scale, alpha)
    assert torch.allclose(loss, reference)
