import pytest
import torch
import torch.nn.functional as F

from vlp.eval.probe import swap_probe_accuracy
from vlp.eval.retrieval import blockwise_topk, recall_at_k, reranked_recall_at_k
from vlp.eval.zeroshot import class_embeddings, zeroshot_accuracy


def test_recall_hand_made():
    # 3 images on the axes; texts 0,1 describe image 0, text 2 image 1, text 3 image 2.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.2, 0, 0.8], [0, 0.3, 0.7]])
    owner = torch.tensor([0, 0, 1, 2])
    m = recall_at_k(images, texts, owner, ks=(1, 2, 3))
    # i2t top-1: image 0 -> text 0 (hit), image 1 -> text 3 (miss), image 2 -> text 2 (miss).
    assert abs(m["i2t_R@1"] - 100 / 3) < 1e-4
    # top-2: image 1 -> [3, 1] miss; image 2 -> [2, 3] hit.
    assert abs(m["i2t_R@2"] - 200 / 3) < 1e-4
    assert m["i2t_R@3"] == 100.0
    # t2i top-1: t0->0 hit, t1->0 hit, t2->2 miss, t3->2 hit.
    assert m["t2i_R@1"] == 75.0
    assert m["t2i_R@2"] == 75.0  # text 2 ranks images [2, 0, 1]
    assert m["t2i_R@3"] == 100.0


def _hand_made():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.2, 0, 0.8], [0, 0.3, 0.7]])
    return images, texts, torch.tensor([0, 0, 1, 2])


def test_rerank_with_an_oracle_fixes_the_shortlist():
    images, texts, owner = _hand_made()
    oracle = lambda i, t: (owner[t] == i).float()  # noqa: E731  (a perfect ITM head)
    m = reranked_recall_at_k(images, texts, owner, oracle, k_test=3, ks=(1, 2))
    # Each query's true match is in its ITC top-3, so the oracle puts it first.
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == 100.0
    # k_test=1: nothing to re-rank, the ITC recalls come back unchanged.
    plain = recall_at_k(images, texts, owner, ks=(1, 2))
    assert reranked_recall_at_k(images, texts, owner, oracle, k_test=1, ks=(1, 2)) == plain


def test_rerank_with_an_adversary_only_moves_the_shortlist():
    images, texts, owner = _hand_made()
    adversary = lambda i, t: -(owner[t] == i).float()  # noqa: E731
    m = reranked_recall_at_k(images, texts, owner, adversary, k_test=2, ks=(1, 2, 3))
    # Image 0's two captions fill its top-2: both pushed down equally, still a hit at 1.
    assert abs(m["i2t_R@1"] - 100 / 3) < 1e-4 and abs(m["i2t_R@2"] - 200 / 3) < 1e-4
    # t2i: texts 0, 1, 3 had their image first of a 2-item shortlist; now second.
    assert m["t2i_R@1"] == 0.0 and m["t2i_R@2"] == 75.0
    assert m["t2i_R@3"] == 100.0  # text 2's image was outside the shortlist: rank 3 stays


def test_blockwise_topk_equals_full():
    torch.manual_seed(0)
    q, g = torch.randn(50, 8), torch.randn(70, 8)
    full = (q @ g.T).topk(5, dim=1).indices
    assert torch.equal(blockwise_topk(q, g, 5, block=7), full)
    assert blockwise_topk(q, g[:3], 10).shape == (50, 3)


def test_zeroshot_known_answer():
    vocab = {"red": torch.tensor([1.0, 0, 0]), "blue": torch.tensor([0, 1.0, 0])}

    def embed(prompts):
        return torch.stack([sum(v for w, v in vocab.items() if w in p) + 0.1 for p in prompts])

    classes = class_embeddings(embed, ["red", "blue"], ["a {}", "the {} one"])
    assert classes.shape == (2, 3)
    torch.testing.assert_close(classes.norm(dim=1), torch.ones(2))
    images = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.1, 1.0, 0], [0.9, 0.0, 0.1]]), dim=-1)
    assert abs(zeroshot_accuracy(images, torch.tensor([0, 1, 0]), classes) - 100.0) < 1e-6
    assert abs(zeroshot_accuracy(images, torch.tensor([1, 1, 1]), classes) - 100 / 3) < 1e-4


def test_swap_probe():
    true, false = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.1, 0.7, 0.5])  # a tie is a miss
    assert abs(swap_probe_accuracy(true, false) - 100 / 3) < 1e-4


def test_recall_with_a_max_over_queries_similarity_matches_brute_force():
    from vlp.losses.itc import max_query_similarity

    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(7, 3, 5, generator=gen), dim=-1)  # 3 query embeddings each
    texts = F.normalize(torch.randn(14, 5, generator=gen), dim=-1)
    owner = torch.arange(7).repeat_interleave(2)
    full = max_query_similarity(images, texts)  # [7, 14], computed at once
    i2t_hit = owner[full.argmax(dim=1)] == torch.arange(7)
    t2i_hit = full.T.argmax(dim=1) == owner
    metrics = recall_at_k(images, texts, owner, ks=(1,), block=2, similarity=max_query_similarity)
    assert metrics["i2t_R@1"] == pytest.approx(100 * i2t_hit.float().mean().item())
    assert metrics["t2i_R@1"] == pytest.approx(100 * t2i_hit.float().mean().item())


def test_gallery_tiles_give_the_same_top_k_as_one_pass():
    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(37, 8, generator=gen), torch.randn(503, 8, generator=gen)
    reference = (queries @ gallery.T).topk(10, dim=1).indices
    for gallery_block in (7, 64, 1000):
        assert torch.equal(blockwise_topk(queries, gallery, 10, block=16, gallery_block=gallery_block), reference)
