"""Masked image modeling, the image tokenizer, BEiT-3's masked data modeling and VLMo's
stagewise pretraining with frozen parameters."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

import vlp
from vlp.cli import app
from vlp.losses.mim import block_mask
from vlp.nn.image_tokenizer import ImageTokenizer, patchify

TOKENS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 4, "heads": 2},
    "text": {"vocab_size": 60, "context_length": 16},
    "fusion_layers": 2,
    "embed_dim": 16,
    "codebook_size": 8,
    "tokens": TOKENS,
}


def test_block_mask_hides_about_the_ratio_in_blocks():
    masks = block_mask(64, 8, ratio=0.4, generator=torch.Generator().manual_seed(0)).view(64, 8, 8)
    ratios = masks.flatten(1).float().mean(dim=1)
    assert (ratios >= 0.4).all() and ratios.mean() < 0.55
    padded = F.pad(masks.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[masks] > 0).all()  # blocks, never isolated patches
    with pytest.raises(ValueError):
        block_mask(1, 8, ratio=1.0)


def test_image_tokenizer_finds_the_patch_clusters_and_round_trips(tmp_path):
    # Patches of two flat colours: a codebook of 2 tells them apart.
    red, blue = torch.tensor([1.0, -1, -1])[:, None, None], torch.tensor([-1.0, -1, 1])[:, None, None]
    images = torch.stack([torch.cat([red.expand(3, 8, 16), blue.expand(3, 8, 16)], dim=1) for _ in range(4)])
    tokenizer = ImageTokenizer(codebook_size=2, patch_size=8)
    assert tokenizer.fit(images) < 1e-6
    ids = tokenizer.encode(images)
    assert ids.shape == (4, 4) and (ids[:, :2] == ids[0, 0]).all() and (ids[:, 2:] != ids[0, 0]).all()
    assert patchify(images, 8).shape == (4, 4, 3 * 64)
    tokenizer.save(tmp_path / "codebook.safetensors")
    assert torch.equal(ImageTokenizer.load(tmp_path / "codebook.safetensors").encode(images), ids)
    with pytest.raises(RuntimeError, match="no codebook"):
        ImageTokenizer(2, 8).encode(images)


def model_with_codebook(recipe="vlmo", **overrides):
    torch.manual_seed(0)
    model = vlp.create_model(recipe, {**MODEL, **overrides})
    model.image_tokenizer.fit(torch.randn(8, 3, 32, 32))
    return model


def test_mim_loss_scores_only_the_hidden_patches(monkeypatch):
    model = model_with_codebook(objectives=["mim"])
    hidden = torch.zeros(2, 16, dtype=torch.bool)
    hidden[:, 5:9] = True
    monkeypatch.setattr("vlp.models.vlmo.block_mask", lambda *args, **kwargs: hidden)
    images = torch.randn(2, 3, 32, 32)
    loss = model(
        {
            "images": images,
            "input_ids": torch.ones(2, 4, dtype=torch.long),
            "attention_mask": torch.ones(2, 4, dtype=torch.long),
        }
    )["mim"]
    x = model.vision_embed.embed(images, hidden, model.mask_token) + model.type_embed.weight[0]
    logits = model.mim_head(model.image_states(x)[:, 1:])
    targets = model.image_tokenizer.encode(images)
    torch.testing.assert_close(loss, F.cross_entropy(logits[hidden], targets[hidden]))


def test_beit3_is_masked_data_modeling_over_images_texts_and_pairs():
    model = model_with_codebook("beit3")
    assert model.cfg.mlm_probability == 0.5 and model.cfg.text_mlm_probability == 0.15
    ids = torch.randint(9, 60, (4, 7))
    ids[:, 0], ids[:, -1] = 2, 3
    out = model({"images": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert set(out) == {"mim", "text_mlm", "mlm"} and all(torch.isfinite(v) for v in out.values())


def test_stagewise_pretraining_freezes_what_stage_two_must_keep(tmp_path, shapes_dir):
    runner = CliRunner()
    codebook = tmp_path / "codebook.safetensors"
    result = runner.invoke(
        app,
        [
            "tokenizer",
            "image",
            str(shapes_dir),
            "--out",
            str(codebook),
            "--images",
            "16",
            "--codebook",
            "8",
            "--image-size",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    model = {k: v for k, v in MODEL.items() if k != "tokens"}
    model.update(text={"context_length": 32}, objectives=["mim"], image_tokenizer=str(codebook))
    config = {
        "recipe": "vlmo",
        "model": model,
        "data": {"path": str(shapes_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": 3, "warmup": 1, "log_every": 1, "ckpt_every": 3},
    }
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump(config))
    common = ["--no-progress", "--data", str(shapes_dir), "data.batch_size=8", "data.workers=0", "train.warmup=1"]
    result = runner.invoke(
        app, ["train", "vlmo", "--config", str(tmp_path / "s1.yaml"), "--out", str(tmp_path / "s1"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "train",
            "vlmo_stage2",
            "--init",
            str(tmp_path / "s1"),
            "--out",
            str(tmp_path / "s2"),
            "--steps",
            "3",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    s1, s2 = vlp.load(tmp_path / "s1").state_dict(), vlp.load(tmp_path / "s2").state_dict()
    frozen = [k for k in s1 if ".attn." in k or ".mlp_first." in k or k.startswith("vision_embed.")]
    assert frozen and all(torch.equal(s1[k], s2[k]) for k in frozen)
    assert not torch.equal(s1["transformer.blocks.0.mlp.fc1.weight"], s2["transformer.blocks.0.mlp.fc1.weight"])
    records = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r.get("event") == "freeze")["parameters"] > 0
    assert all(set(r) >= {"text_mlm"} for r in records if "loss" in r)
    result = runner.invoke(
        app,
        [
            "train",
            "vlmo",
            "--init",
            str(tmp_path / "s2"),
            "--out",
            str(tmp_path / "s3"),
            "--steps",
            "2",
            "model.objectives=[itc,itm,mlm]",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "train",
            "vlmo_stage2",
            "--init",
            str(tmp_path / "s1"),
            "--out",
            str(tmp_path / "x"),
            "--steps",
            "1",
            "train.freeze=[transformer.blockz.*]",
            *common,
        ],
    )
    assert result.exit_code != 0 and "matches no parameter" in str(result.exception)
