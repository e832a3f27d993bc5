"""VLMo: each modality's tokens go only through their expert, one shared self-attention,
the three objectives and their gradients, and the recipe end to end."""

import json

import pytest
import torch
import yaml

import vlp
from vlp.config import load_run_config
from vlp.train.trainer import Trainer

TOKENS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "heads": 2},
    "text": {"vocab_size": 60, "context_length": 16},
    "fusion_layers": 2,
    "embed_dim": 16,
    "tokens": TOKENS,
}
IMAGE_TOKENS = 1 + (32 // 8) ** 2


def texts(size: int = 3):
    ids = torch.randint(9, 60, (size, 7), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 2, 3
    return ids, torch.ones_like(ids)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vlp.create_model("vlmo", MODEL).eval()


def expert_calls(model, run) -> dict:
    """(block, expert) -> number of tokens that went through it during `run()`."""
    seen = {}
    for i, block in enumerate(model.transformer.blocks):
        for name in ("mlp_first", "mlp", "mlp_fusion"):
            expert = getattr(block, name)
            if expert is not None:
                expert.register_forward_hook(
                    lambda module, inputs, output, key=(i, name): seen.__setitem__(key, inputs[0].shape[1])
                )
    with torch.no_grad():
        run()
    return seen


def test_each_modality_goes_through_its_own_expert(model):
    images, (ids, mask) = torch.randn(3, 3, 32, 32), texts()
    assert [b.mlp_fusion is not None for b in model.transformer.blocks] == [False, False, True, True]
    image_only = expert_calls(model, lambda: model.encode_image(images))
    assert image_only == {(i, "mlp_first"): IMAGE_TOKENS for i in range(4)}  # V-FFN only
    text_only = expert_calls(model, lambda: model.encode_text(ids, mask))
    assert text_only == {(i, "mlp"): 7 for i in range(4)}  # L-FFN only
    fused = expert_calls(model, lambda: model.itm_score(model.image_embeddings(images), ids, mask))
    assert fused == {
        (0, "mlp_first"): IMAGE_TOKENS,
        (0, "mlp"): 7,
        (1, "mlp_first"): IMAGE_TOKENS,
        (1, "mlp"): 7,
        (2, "mlp_fusion"): IMAGE_TOKENS + 7,
        (3, "mlp_fusion"): IMAGE_TOKENS + 7,
    }


def test_self_attention_is_one_parameter_set_for_all_modalities(model):
    attention = [n for n, _ in model.named_parameters() if ".attn." in n]
    assert attention and all(n.startswith("transformer.blocks.") for n in attention)
    assert len(attention) == 4 * 4  # per block: qkv and out, weight and bias; nothing per modality
    assert not list(model.vision_embed.transformer.blocks) and not list(model.text_embed.transformer.blocks)


def test_fused_text_sees_the_image_and_padding_is_invisible(model):
    images, (ids, mask) = torch.randn(3, 3, 32, 32), texts()
    emb = model.image_embeddings(images)
    with torch.no_grad():
        a = model.fused_states(emb, ids, mask)
        assert not torch.allclose(a[:, IMAGE_TOKENS:], model.fused_states(emb.flip(0), ids, mask)[:, IMAGE_TOKENS:])
        mask2, ids2 = mask.clone(), ids.clone()
        mask2[0, 5:], ids2[0, 5:] = 0, 11
        b, c = model.fused_states(emb, ids, mask2), model.fused_states(emb, ids2, mask2)
    torch.testing.assert_close(b[0, : IMAGE_TOKENS + 5], c[0, : IMAGE_TOKENS + 5])


def test_objectives_and_gradients():
    torch.manual_seed(0)
    model = vlp.create_model("vlmo", MODEL).train()
    ids, mask = texts(4)
    out = model({"images": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask})
    assert set(out) == {"itc", "itm", "mlm"} and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    idle = {n for n, p in model.named_parameters() if p.grad is None}
    assert idle == {"mask_token", "mim_head.weight", "mim_head.bias"}  # masked image modeling is off


def test_trains_and_evaluates(tmp_path, shapes_dir):
    model = {k: v for k, v in MODEL.items() if k != "tokens"}
    model["text"] = {"context_length": 32}
    config = {
        "recipe": "vlmo",
        "model": model,
        "data": {"path": str(shapes_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": 4, "warmup": 1, "log_every": 1, "ckpt_every": 4},
    }
    (tmp_path / "vlmo.yaml").write_text(yaml.safe_dump(config))
    Trainer(load_run_config("vlmo", tmp_path / "vlmo.yaml"), tmp_path / "run", progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"itc", "itm", "mlm"} <= set(r) for r in records if "loss" in r)
    from vlp.eval.run import evaluate

    results = evaluate(vlp.load(tmp_path / "run"), shapes_dir, tasks=["retrieval"], k_test=3)
    assert results["retrieval_itm"]["k_test"] == 3 and "i2t_R@1" in results["retrieval"]


def test_different_texts_start_with_different_features(model):
    """The token-type embedding starts small (BERT's std 0.02): drawn from N(0, 1) it swamped the
    tokens, every text got nearly the same feature and ITC sat at log(batch) for 200 steps."""
    ids, mask = texts(8)
    with torch.no_grad():
        features = model.encode_text(ids, mask)
    similarity = features @ features.T
    assert similarity[~torch.eye(8, dtype=torch.bool)].mean() < 0.98


def coloured_pairs(classes: torch.Tensor):
    """Images lit in one of 3 channels at one of 2 brightnesses (6 classes), and a text naming
    the class with one token: a matching task that any fusion that sees both sides can learn."""
    images = torch.randn(len(classes), 3, 32, 32) * 0.3
    images[torch.arange(len(classes)), classes % 3] += 1.0 + (classes // 3).float().view(-1, 1, 1)
    ids = torch.full((len(classes), 5), 9)
    ids[:, 0], ids[:, 2], ids[:, -1] = 2, 10 + classes, 3
    return images, ids, torch.ones_like(ids)


@pytest.mark.parametrize("token", ["text", "image"])
def test_fusion_mode_itm_learns_to_match(token):
    """ITM on the pooled fused sequence learns which caption names the image (random negatives),
    pooling the text [CLS] (the paper's) or the image [CLS]: either reads the other modality
    through the shared self-attention."""
    torch.manual_seed(0)
    config = {**MODEL, "objectives": ["itm"], "hard_negatives": False, "itm_token": token}
    model = vlp.create_model("vlmo", config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(100):
        images, ids, mask = coloured_pairs(torch.randint(0, 6, (16,)))
        loss = model({"images": images, "input_ids": ids, "attention_mask": mask})["itm"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classes = torch.arange(6).repeat(4)
    images, ids, mask = coloured_pairs(classes)
    wrong = coloured_pairs((classes + 1 + torch.randint(0, 5, classes.shape)) % 6)[1]
    with torch.no_grad():
        emb = model.eval().image_embeddings(images)
        right_score, wrong_score = model.itm_score(emb, ids, mask), model.itm_score(emb, wrong, mask)
    assert (right_score > wrong_score).float().mean() > 0.9
    assert right_score.mean() > 0.5 > wrong_score.mean()


def test_itm_reads_the_token_itm_token_names():
    """The paper pools the pair's text [CLS] (Sec. 2.2): in vlp's [image; text] sequence it
    follows the image tokens; `itm_token: image` reads the image [CLS] that leads it."""
    torch.manual_seed(0)
    model = vlp.create_model("vlmo", MODEL).eval()
    images, ids, mask = coloured_pairs(torch.arange(3))
    with torch.no_grad():
        emb = model.image_embeddings(images)
        states = model.fused_states(emb, ids, mask)
        torch.testing.assert_close(model.itm_logits(emb, ids, mask), model.itm_head(states[:, emb.shape[1]]))
        model.cfg.itm_token = "image"
        torch.testing.assert_close(model.itm_logits(emb, ids, mask), model.itm_head(states[:, 0]))
    with pytest.raises(ValueError, match="model.itm_token"):
        vlp.create_model("vlmo", {**MODEL, "itm_token": "pair"})
