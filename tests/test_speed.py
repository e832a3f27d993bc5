"""Fewer FLOPs for the same model (issue #26): FLIP's patch dropout keeps the class token and
the stated share of patches in training, changes nothing in evaluation, and keeps resume exact."""

import pytest
import torch
from test_train import final_weights

import vlp
from vlp.config import load_run_config
from vlp.nn.vit import PatchDropout, VisionConfig, VisionTransformer
from vlp.train.trainer import Trainer


def test_patch_dropout_keeps_the_class_token_and_the_stated_share():
    tokens = torch.arange(3 * 17, dtype=torch.float32).reshape(3, 17, 1).expand(-1, -1, 4)  # cls + 16 patches
    dropout = PatchDropout(0.75, extra=1).train()
    torch.manual_seed(0)
    kept = dropout(tokens)
    assert kept.shape == (3, 1 + 4, 4)
    assert torch.equal(kept[:, 0], tokens[:, 0])  # the class token, first
    for image, rows in zip(tokens, kept):
        ids = rows[1:, 0].long().tolist()
        assert ids == sorted(ids) and len(set(ids)) == 4  # distinct patches, in their order
        assert set(ids) <= set(image[1:, 0].long().tolist())
    assert len({tuple(rows[1:, 0].tolist()) for rows in kept}) > 1  # each image draws its own
    assert torch.equal(dropout.eval()(tokens), tokens)  # evaluation sees every patch
    with pytest.raises(ValueError, match="patch_dropout"):
        PatchDropout(1.0, extra=1)


def test_a_tower_with_patch_dropout_trains_on_fewer_tokens_and_evaluates_as_without():
    config = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
    torch.manual_seed(0)
    plain = VisionTransformer(VisionConfig(**config)).eval()
    torch.manual_seed(0)
    dropped = VisionTransformer(VisionConfig(**config, patch_dropout=0.5))
    images = torch.randn(2, 3, 32, 32)
    pooled, tokens = dropped.train()(images)
    assert tokens.shape == (2, 1 + 8, 32)  # 16 patches, half kept
    pooled.sum().backward()
    assert dropped.patch_embed.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(dropped.eval()(images)[0], plain(images)[0])


def test_resume_stays_exact_with_patch_dropout(tmp_path, tiny_config):
    cfg = load_run_config(
        "clip", tiny_config, ["train.steps=4", "train.ckpt_every=2", "model.vision.patch_dropout=0.5"]
    )
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    Trainer(cfg, tmp_path / "resumed", progress=False).fit(stop_at=2)
    Trainer(cfg, tmp_path / "resumed", resume=True, progress=False).fit()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert vlp.load(tmp_path / "straight").visual.patch_dropout.share == 0.5


def test_open_clip_patch_dropout_maps_to_the_tower():
    from vlp.interop.clip import config_from_open_clip

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "patch_dropout": 0.5},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
    }
    assert config_from_open_clip(model_cfg, {})[1]["vision"]["patch_dropout"] == 0.5
