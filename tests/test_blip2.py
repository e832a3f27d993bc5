"""Q-Former masks and BLIP-2 stage 1: what each stream can see, and a frozen image encoder."""

import json

import pytest
import torch
import yaml

import vlp
from vlp.config import load_run_config
from vlp.nn.qformer import QFormer, QFormerConfig, qformer_mask
from vlp.train.trainer import Trainer

TOKENS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "enc": 5, "dec": 6}
QFORMER = {
    "num_queries": 3,
    "context_length": 16,
    "width": 32,
    "layers": 4,
    "heads": 2,
    "cross_attention_every": 2,
    "vocab_size": 60,
}
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 3, "heads": 2},
    "qformer": QFORMER,
    "embed_dim": 16,
    "tokens": TOKENS,
}


def texts(seed: int = 0, size: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, 60, (size, 7), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def test_mask_builder_values():
    text_mask = torch.tensor([[1, 1, 0]])
    q, t = [True] * 2, [True, True, False]
    unimodal = [q + [False] * 3] * 2 + [[False, False] + t] * 3
    causal = [q + [False] * 3] * 2 + [q + [True, False, False], q + [True, True, False], q + t]
    bidirectional = [q + t] * 5
    for mode, expected in (("unimodal", unimodal), ("causal", causal), ("bidirectional", bidirectional)):
        assert qformer_mask(2, text_mask, mode)[0, 0].tolist() == expected, mode
    with pytest.raises(ValueError, match="mode"):
        qformer_mask(2, text_mask, "sideways")


@pytest.fixture
def qformer():
    torch.manual_seed(0)
    return QFormer(QFormerConfig(**QFORMER, context_dim=24)).eval()


def run(qformer, image_feats, ids, mask, mode):
    with torch.no_grad():
        return qformer(image_feats, ids, mask, mode=mode)


def test_unimodal_mask_keeps_the_streams_apart(qformer):
    feats, other_feats = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    (ids, mask), (other_ids, _) = texts(0), texts(1)
    queries, text = run(qformer, feats, ids, mask, "unimodal")
    assert torch.equal(queries, run(qformer, feats, other_ids, mask, "unimodal")[0])
    torch.testing.assert_close(text, run(qformer, other_feats, ids, mask, "unimodal")[1])
    torch.testing.assert_close(text, qformer(None, ids, mask)[1])  # text alone: the same
    torch.testing.assert_close(queries, qformer(feats)[0])  # queries alone: the same
    assert not torch.allclose(queries, run(qformer, other_feats, ids, mask, "unimodal")[0])


def test_causal_mask_hides_future_text_but_shows_the_queries(qformer):
    feats = torch.randn(2, 5, 24)
    ids, mask = texts(0)
    queries, text = run(qformer, feats, ids, mask, "causal")
    changed = ids.clone()
    changed[:, 4:] = 7
    queries2, text2 = run(qformer, feats, changed, mask, "causal")
    assert torch.equal(queries, queries2)
    torch.testing.assert_close(text[:, :4], text2[:, :4])
    assert not torch.allclose(text[1, 4:], text2[1, 4:])
    assert not torch.allclose(text, run(qformer, torch.randn(2, 5, 24), ids, mask, "causal")[1])


def test_bidirectional_mask_lets_queries_read_the_text(qformer):
    feats = torch.randn(2, 5, 24)
    (ids, mask), (other_ids, _) = texts(0), texts(1)
    queries = run(qformer, feats, ids, mask, "bidirectional")[0]
    assert not torch.allclose(queries, run(qformer, feats, other_ids, mask, "bidirectional")[0])
    padded = ids.clone()
    padded[0, 5:] = 11  # only padding changed: invisible
    torch.testing.assert_close(queries[0], run(qformer, feats, padded, mask, "bidirectional")[0][0])


def test_queries_cross_attend_every_second_layer_and_have_their_own_feed_forward(qformer):
    blocks = qformer.text.transformer.blocks
    assert [b.cross_attn is not None for b in blocks] == [True, False, True, False]
    assert all(b.mlp_first is not None and b.mlp_first is not b.mlp for b in blocks)


@pytest.fixture
def blip2_config(tmp_path, shapes_dir):
    model = {k: v for k, v in MODEL.items() if k != "tokens"}
    model["qformer"] = {k: v for k, v in QFORMER.items() if k != "vocab_size"}
    config = {
        "recipe": "blip2_stage1",
        "model": model,
        "data": {"path": str(shapes_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": 4, "lr": 1e-3, "warmup": 1, "log_every": 1, "ckpt_every": 4},
    }
    path = tmp_path / "blip2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stage1_trains_the_qformer_and_never_the_frozen_image_encoder(tmp_path, blip2_config, shapes_dir):
    trainer = Trainer(load_run_config("blip2_stage1", blip2_config), tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = vlp.load(tmp_path / "run").state_dict()
    frozen = [k for k in before if k.startswith("visual.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["qformer.query_tokens"], after["qformer.query_tokens"])
    assert not torch.equal(before["ln_vision.weight"], after["ln_vision.weight"])
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in trainer.model.visual.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"itc", "itg", "itm"} <= set(r) for r in records if "loss" in r)
    from vlp.eval.run import evaluate

    results = evaluate(vlp.load(tmp_path / "run"), shapes_dir, tasks=["zeroshot", "retrieval", "probe"], k_test=3)
    assert {"i2t_R@1", "t2i_R@10"} <= set(results["retrieval"]) and results["retrieval_itm"]["k_test"] == 3
    assert {"color_top1", "shape_top1"} <= set(results["zeroshot"])
    assert {"accuracy", "itm_accuracy"} <= set(results["probe"])


def test_stage1_losses_give_gradients_to_everything_but_the_image_encoder():
    torch.manual_seed(0)
    model = vlp.create_model("blip2_stage1", MODEL).train()
    ids, mask = texts(0, size=4)
    out = model({"images": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask})
    assert set(out) == {"itc", "itg", "itm"}
    sum(out.values()).backward()
    assert all(p.grad is None for p in model.visual.parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert not model.visual.training  # the frozen encoder stays in eval mode


def test_stage1_starts_from_a_trained_clip_image_tower(tmp_path, tiny_config, shapes_dir):
    """`vlp train blip2_stage1 --init CLIP_RUN`: the CLIP run's vision section and weights become
    the frozen encoder; the rest of the CLIP config does not carry over."""
    from typer.testing import CliRunner

    from vlp.cli import app

    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["train", "clip", "--config", str(tiny_config), "--out", str(tmp_path / "clip"), "--no-progress"]
        ).exit_code
        == 0
    )
    config = {
        "recipe": "blip2_stage1",
        "model": {"qformer": {k: v for k, v in QFORMER.items() if k != "vocab_size"}, "embed_dim": 16},
        "data": {"path": str(shapes_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": 2, "warmup": 1, "log_every": 1, "ckpt_every": 2},
    }
    (tmp_path / "blip2.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(
        app,
        [
            "train",
            "blip2_stage1",
            "--config",
            str(tmp_path / "blip2.yaml"),
            "--init",
            str(tmp_path / "clip"),
            "--out",
            str(tmp_path / "blip2"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    clip, blip2 = vlp.load(tmp_path / "clip").state_dict(), vlp.load(tmp_path / "blip2").state_dict()
    tower = [k for k in clip if k.startswith("visual.")]
    assert tower and all(torch.equal(clip[k], blip2[k]) for k in tower)
