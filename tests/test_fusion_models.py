"""ALBEF and BLIP: losses, momentum encoders, masks, decoder sharing, training and resume."""

import copy
import json

import pytest
import torch
import yaml

import vlp
from vlp.config import load_run_config
from vlp.train.optim import build_optimizer
from vlp.train.trainer import Trainer

TOKENS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4, "enc": 5, "dec": 6}
TEXT = {
    "context_length": 16,
    "width": 32,
    "layers": 4,
    "heads": 2,
    "causal": False,
    "pool": "cls",
    "pre_norm": False,
    "embed_norm": True,
    "cross_attention_every": 1,
}
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "contrastive": {"embed_dim": 16, "queue_size": 64, "alpha_ramp_steps": 4, "momentum": 0.9},
}


def model_config(recipe: str, **overrides) -> dict:
    text = {**TEXT, "vocab_size": 60, **({"cross_attention_from": 2} if recipe == "albef" else {})}
    return {**MODEL, "text": text, "tokens": TOKENS, **overrides}


def batch(size: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, 60, (size, 10), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, 7:], ids[0, 6], ids[0, 7:] = 0, 3, 0
    return {"images": torch.randn(size, 3, 32, 32, generator=gen), "input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("recipe, losses", [("albef", {"itc", "itm", "mlm"}), ("blip", {"itc", "itm", "lm"})])
def test_losses_and_gradients(recipe, losses):
    torch.manual_seed(0)
    model = vlp.create_model(recipe, model_config(recipe))
    out = model(batch())
    assert set(out) == losses and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("momentum.") for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), [
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    ]
    assert all(p.grad is None for p in model.momentum.parameters())
    optimised = {
        id(p) for group in build_optimizer(model, load_run_config(recipe).train).param_groups for p in group["params"]
    }
    assert not any(id(p) in optimised for p in model.momentum.parameters())


@pytest.mark.parametrize("objectives", [["itc"], ["itc", "itm"], ["itm", "mlm"]])
def test_albef_ablation_trains_only_its_objectives(objectives):
    """ALBEF's Table 1 rows are configuration: the fusion layers and heads of objectives left
    out get no gradient, and the model says so (DDP must be told)."""
    torch.manual_seed(0)
    model = vlp.create_model("albef", model_config("albef", objectives=objectives))
    out = model(batch())
    assert set(out) == set(objectives) and model.has_unused_parameters
    sum(out.values()).backward()
    fusion_grad = model.text.transformer.blocks[2].cross_attn.q.weight.grad
    assert (fusion_grad is not None) == (objectives != ["itc"])
    assert (model.itm_head.weight.grad is not None) == ("itm" in objectives)
    with pytest.raises(ValueError, match="subset"):
        vlp.create_model("albef", model_config("albef", objectives=["lm"]))


def test_momentum_encoders_follow_the_ema():
    torch.manual_seed(0)
    model = vlp.create_model("blip", model_config("blip"))
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(1.0)  # as if an optimizer step moved the online encoder
    before = [p.clone() for p in model.momentum["visual"].parameters()]
    model.after_optimizer_step()
    for p, p_m, old in zip(model.visual.parameters(), model.momentum["visual"].parameters(), before):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p, rtol=0, atol=1e-6)
    assert int(model.contrast.step) == 1 and model.contrast.alpha() == pytest.approx(0.4 / 4)


def test_queue_fills_with_momentum_features():
    torch.manual_seed(0)
    model = vlp.create_model("albef", model_config("albef"))
    b = batch()
    model(b)
    assert int(model.contrast.text_queue.ptr) == 6
    with torch.no_grad():
        expected = model.encode_image(b["images"])  # momentum == online at initialisation
    torch.testing.assert_close(model.contrast.image_queue.features[:6], expected, atol=1e-5, rtol=0)


def test_blip_decoder_is_causal_and_shares_all_but_self_attention():
    torch.manual_seed(0)
    model = vlp.create_model("blip", model_config("blip")).eval()
    b = batch()
    image_tokens = model.visual(b["images"])[1]
    changed = b["input_ids"].clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 50 + 9
    mask = torch.ones_like(changed)
    a = model.caption_logits(image_tokens, b["input_ids"], mask)
    c = model.caption_logits(image_tokens, changed, mask)
    torch.testing.assert_close(a[:, :5], c[:, :5])
    assert not torch.allclose(a[:, 5:], c[:, 5:])
    other = model.caption_logits(image_tokens.flip(0), b["input_ids"], mask)  # sees the image
    assert not torch.allclose(a, other)
    encoder = {id(p) for p in model.text.parameters()}
    own = [n for n, p in model.decoder.named_parameters() if id(p) not in encoder]
    assert own and all(".attn." in n or ".norm1." in n for n in own)


def test_blip_itm_and_lm_share_the_image_keys_values():
    """The MED's tied cross-attention projects the images once per step for ITM and LM (a
    context-only cache), with the losses and gradients of projecting them in each pass."""
    torch.manual_seed(0)
    shared = vlp.create_model("blip", model_config("blip"))
    separate = copy.deepcopy(shared)
    separate.cfg.share_decoder = False  # weights stay tied; only the cache is left out
    projections = {}
    for name, model in (("shared", shared), ("separate", separate)):
        kv = model.text.transformer.blocks[0].cross_attn.kv
        calls = []
        kv.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        out = model(batch())
        sum(out.values()).backward()
        projections[name] = (len(calls), out)
    assert projections["shared"][0] == 1 and projections["separate"][0] == 2
    for key, loss in projections["shared"][1].items():
        torch.testing.assert_close(loss, projections["separate"][1][key], atol=1e-6, rtol=0)
    grads = dict(separate.named_parameters())
    for name, param in shared.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-5, rtol=1e-5)


def test_albef_fusion_layers_see_the_image_text_layers_do_not():
    torch.manual_seed(0)
    model = vlp.create_model("albef", model_config("albef")).eval()
    b = batch()
    text = model.encode_text(b["input_ids"], b["attention_mask"])
    tokens = model.visual(b["images"])[1]
    s1 = model.itm_score(tokens, b["input_ids"], b["attention_mask"])
    s2 = model.itm_score(tokens.flip(0), b["input_ids"], b["attention_mask"])
    assert text.shape == (6, 16) and not torch.allclose(s1, s2)
    assert [i for i, blk in enumerate(model.text.transformer.blocks) if blk.cross_attn is not None] == [2, 3]


@pytest.mark.parametrize("recipe", ["albef", "blip", "blip2_stage1", "vlmo"])
def test_itm_score_with_image_rows_equals_materialised_images(recipe):
    """Scoring pairs as rows into distinct images (what ITM re-ranking and the ITM loss do, each
    image projected once) gives the scores of the materialised per-pair images."""
    from tests import test_blip2, test_vlmo

    config = {"blip2_stage1": test_blip2.MODEL, "vlmo": test_vlmo.MODEL}.get(recipe) or model_config(recipe)
    torch.manual_seed(0)
    model = vlp.create_model(recipe, config).eval()
    b = batch(size=5)
    images = model.itm_image_tokens(b["images"][:2])
    rows = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        by_rows = model.itm_score(images, b["input_ids"], b["attention_mask"], image_rows=rows)
        materialised = model.itm_score(images[rows], b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(by_rows, materialised, atol=1e-6, rtol=0)
    assert not torch.allclose(by_rows, model.itm_score(images[1 - rows], b["input_ids"], b["attention_mask"]))


def test_itm_scorer_reads_images_per_block_and_equals_direct_scores(shapes_dir):
    """The evaluation's ITM scorer (pairs sorted by image, each block's images read and encoded
    when it runs) gives the scores of encoding every image up front, whatever the block size."""
    from vlp.data.formats import open_dataset
    from vlp.data.tokenizer import Tokenizer
    from vlp.data.transforms import model_images
    from vlp.eval.encode import itm_scorer

    tokenizer = Tokenizer.load(shapes_dir)
    torch.manual_seed(0)
    model = vlp.create_model(
        "blip", model_config("blip", text={**TEXT, "vocab_size": tokenizer.vocab_size}, tokens=tokenizer.special_ids())
    ).eval()
    model.tokenizer = tokenizer
    dataset = open_dataset(shapes_dir, split="test")
    kept = [0, 2, 3, 5]
    texts = [dataset.captions(i)[0] for i in range(6)]
    image_rows, text_rows = torch.tensor([3, 0, 3, 1, 2, 0, 3]), torch.tensor([0, 1, 2, 3, 4, 5, 0])
    with torch.no_grad():
        tokens = model.itm_image_tokens(model_images(model, [dataset[i].image for i in kept]))
        ids = tokenizer(texts, max_length=16, style="bert")
        expected = model.itm_score(tokens[image_rows], ids["input_ids"][text_rows], ids["attention_mask"][text_rows])
    for block in (2, 3, 128):
        scores = itm_scorer(model, dataset, kept, texts, batch_size=block)(image_rows, text_rows)
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


def test_missing_special_tokens_are_named():
    with pytest.raises(ValueError, match="mask"):
        vlp.create_model("albef", model_config("albef", tokens={"pad": 0, "cls": 2, "sep": 3}))


@pytest.fixture
def fusion_config(tmp_path, shapes_dir):
    def write(recipe: str, momentum: float = 0.9, **train) -> object:
        model = model_config(recipe)
        model["contrastive"] = {**model["contrastive"], "momentum": momentum}
        model.pop("tokens")
        model["text"].pop("vocab_size")
        config = {
            "recipe": recipe,
            "model": model,
            "data": {"path": str(shapes_dir), "batch_size": 16, "workers": 0},
            "train": {"steps": 6, "lr": 1e-3, "warmup": 2, "log_every": 1, "ckpt_every": 3, **train},
        }
        path = tmp_path / f"{recipe}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.mark.parametrize("recipe", ["albef", "blip"])
def test_training_lowers_the_losses(tmp_path, fusion_config, recipe):
    # Without momentum distillation, whose soft targets keep the ITC loss high early on.
    cfg = load_run_config(recipe, fusion_config(recipe, momentum=0, steps=60, log_every=5, ckpt_every=60))
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    generative = "mlm" if recipe == "albef" else "lm"
    for name in ("itc", generative):
        first = sum(r[name] for r in logged[:2]) / 2
        last = sum(r[name] for r in logged[-3:]) / 3  # MLM/LM on 16 captions a step are noisy
        assert last < 0.9 * first, (name, first, last)


def test_blip_resume_is_exact(tmp_path, fusion_config):
    """Momentum encoders, queues and the hard-negative RNG resume too."""
    cfg = load_run_config("blip", fusion_config("blip"))
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    Trainer(cfg, tmp_path / "resumed", progress=False).fit(stop_at=3)
    Trainer(cfg, tmp_path / "resumed", resume=True, progress=False).fit()
    a, b = vlp.load(tmp_path / "straight").state_dict(), vlp.load(tmp_path / "resumed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_blip_cli_train_eval_caption(tmp_path, fusion_config, shapes_dir):
    from typer.testing import CliRunner

    from vlp.cli import app

    runner, run = CliRunner(), tmp_path / "blip"
    result = runner.invoke(
        app, ["train", "blip", "--config", str(fusion_config("blip")), "--out", str(run), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["eval", str(run), "--tasks", "retrieval,caption,probe", "--k-test", "4", "--decoding", "greedy"]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((run / "eval.json").read_text())
    assert results["retrieval_itm"]["itm_pairs"] == 4 * (24 + 24 * 5)  # k_test per query, both ways
    assert {"bleu4", "cider", "distinct_2"} <= set(results["caption"])
    assert results["caption"]["decoding"][0] == "method=greedy"
    assert {"accuracy", "itm_accuracy", "itm_relation_accuracy"} <= set(results["probe"])
    assert "generated:" in (run / "report.html").read_text()
    image = tmp_path / "image.png"
    vlp.data.shapes.ShapesWorld(image_size=32).sample("test", 0).image.save(image)
    result = runner.invoke(app, ["caption", str(run), str(image), "--decoding", "nucleus"])
    assert result.exit_code == 0 and result.output.startswith(str(image)), result.output
    result = runner.invoke(app, ["caption", str(run), str(tmp_path / "missing.png")])
    assert result.exit_code != 0 and "missing.png" in result.output


def test_itm_batch_layout_and_uniform_negatives_when_not_hard():
    from vlp.models.fusion import itm_inputs

    torch.manual_seed(0)
    b = batch(size=4)
    tokens = torch.arange(4.0)[:, None, None].expand(4, 3, 2)  # image i is filled with i
    feat = torch.eye(4)  # image i is most similar to text i, equally far from the others
    draws = torch.zeros(4, 4)
    for _ in range(400):
        itm = itm_inputs(tokens, b["input_ids"], b["attention_mask"], b["input_ids"], feat, feat, torch.zeros(()))
        assert itm.labels.tolist() == [1] * 4 + [0] * 8 and torch.equal(itm.texts[:4], b["input_ids"])
        assert torch.equal(itm.images, tokens)  # each image once; the pairs index it
        images = itm.paired_images()
        assert torch.equal(images[:8, 0, 0].long(), torch.arange(4).repeat(2))
        negative_images = images[8:, 0, 0].long()
        assert (negative_images != torch.arange(4)).all()
        draws[torch.arange(4), negative_images] += 1
    off_diagonal = draws[~torch.eye(4, dtype=torch.bool)] / 400
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, 1 / 3), atol=0.08)


def test_fine_tuning_entry_points(tmp_path, fusion_config, shapes_dir):
    """blip -> blip_vqa / blip_caption with --init: weights carried over, VQA evaluated."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vlp.cli import app

    runner, pretrained = CliRunner(), tmp_path / "blip"
    assert (
        runner.invoke(
            app, ["train", "blip", "--config", str(fusion_config("blip")), "--out", str(pretrained), "--no-progress"]
        ).exit_code
        == 0
    )
    common = [
        "--data",
        str(shapes_dir),
        "--steps",
        "4",
        "--no-progress",
        "data.batch_size=8",
        "data.workers=0",
        "train.ckpt_every=4",
        "train.log_every=1",
    ]
    for recipe in ("blip_vqa", "blip_caption"):
        result = runner.invoke(
            app, ["train", recipe, "--init", str(pretrained), "--out", str(tmp_path / recipe), *common]
        )
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "blip_vqa" / "metrics.jsonl").read_text().splitlines()]
    init = next(r for r in records if r.get("event") == "init")
    # Tiny BLIP's image tokens (32 wide) and question states (32 wide) match here: all loads.
    assert init["missing"] == [] and init["other shape"] == []
    assert any("vqa" in r for r in records)
    saved = load_file(str(next((pretrained / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert "decoder.token_embed.weight" in saved  # tied weights are stored under every name
    vqa_model, blip = vlp.load(tmp_path / "blip_vqa"), vlp.load(pretrained)
    assert vqa_model.recipe == "blip_vqa"
    # 4 steps at lr 2e-4 move a weight by < 1e-3; a fresh initialisation would be ~0.02 away.
    for name in (
        "visual.patch_embed.weight",
        "decoder.token_embed.weight",
        "decoder.transformer.blocks.0.mlp.fc1.weight",
    ):
        moved = (vqa_model.state_dict()[name] - blip.state_dict()[name]).abs().mean()
        assert moved < 2e-3, (name, moved)
    caption_cfg = vlp.load(tmp_path / "blip_caption").run_config
    assert caption_cfg.data.prompt == "a picture of " and caption_cfg.model["objectives"] == ["lm"]
    result = runner.invoke(app, ["eval", str(tmp_path / "blip_vqa"), "--no-report"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "blip_vqa" / "eval.json").read_text())
    assert set(results) == {"data", "vqa", "skipped"}
    assert {"accuracy", "accuracy_color", "accuracy_count", "accuracy_relation"} <= set(results["vqa"])
