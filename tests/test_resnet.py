"""CLIP's modified ResNet image tower (vlp.nn.resnet, CLIP Sec. 2.4), as properties: the shapes
it gives for any image size, gradients reaching every weight, strides that average before they
sample, an attention pool whose one query is the mean, and a ResNet CLIP that trains, saves,
loads and evaluates like a ViT one."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import vlp
from vlp.config import load_run_config, recipe_config_path
from vlp.nn.resnet import AttentionPool, ModifiedResNet, feature_grid
from vlp.nn.vit import VisionConfig


def resnet(image_size=64, width=16, stages=(1, 2, 1, 1), heads=8, out_dim=12) -> ModifiedResNet:
    torch.manual_seed(0)
    cfg = VisionConfig(kind="resnet", image_size=image_size, width=width, stages=stages, heads=heads)
    return ModifiedResNet(cfg, out_dim)


def randomize_norms(model: nn.Module) -> None:
    """BatchNorms with non-trivial affine weights and running statistics (a fresh tower has zero
    residual branches and unit statistics, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("image_size", [32, 48, 64, 96, 100])
def test_shapes_for_any_image_size(image_size):
    tower = resnet(image_size, width=16).eval()
    grid = feature_grid(image_size)
    with torch.no_grad():
        features = tower.stem(torch.randn(2, 3, image_size, image_size))
        for stage in tower.stages:
            features = stage(features)
        pooled, tokens = tower(torch.randn(2, 3, image_size, image_size))
    assert features.shape == (2, 16 * 32, grid, grid)  # 32 x the stem width, 1/32 of the side
    assert pooled.shape == (2, 12) and tokens.shape == (2, 1 + grid * grid, 16 * 32)


def test_rn50_config_has_rn50s_shape():
    cfg = load_run_config("clip", recipe_config_path("clip", "rn50"))
    model = vlp.create_model("clip", cfg.model)
    widths = [stage[0].conv3.out_channels for stage in model.visual.stages]
    assert [len(stage) for stage in model.visual.stages] == [3, 4, 6, 3] and widths == [256, 512, 1024, 2048]
    assert model.visual.attn_pool.pos_embed.shape == (7 * 7 + 1, 2048)
    assert model.visual.attn_pool.heads == 32 and isinstance(model.image_proj, nn.Identity)
    assert sum(p.numel() for p in model.visual.parameters()) == 38_316_896  # open_clip's RN50 visual


def test_gradients_reach_every_weight():
    tower = resnet().train()
    randomize_norms(tower)  # zero-initialised residual branches would get no gradient below norm3
    pooled, _ = tower(torch.randn(4, 3, 64, 64))
    pooled.square().sum().backward()
    dead = [name for name, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_residual_branches_start_at_zero():
    """The last BatchNorm of every bottleneck starts with weight 0, so each block begins as its
    shortcut (Goyal et al. 2017; open_clip's init): a block without a shortcut convolution is the
    identity on its (non-negative) input."""
    tower = resnet(stages=(1, 3, 1, 1)).eval()
    block = tower.stages[1][1]
    assert block.shortcut is None and torch.equal(block.norm3.weight, torch.zeros_like(block.norm3.weight))
    x = F.relu(torch.randn(2, 32 * 4, 8, 8))
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_strides_average_before_they_sample():
    """Anti-aliased strides (Zhang 2019): no convolution but the stem's first has a stride; every
    strided block pools in both paths. A checkerboard at the Nyquist frequency averages to zero in
    the shortcut, where a plain ResNet's stride-2 1x1 convolution would alias it into a shift."""
    tower = resnet()
    strided = [name for name, m in tower.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == ["conv1"]
    for i, stage in enumerate(tower.stages):
        pools = [isinstance(m, nn.AvgPool2d) for m in (stage[0].pool, stage[0].shortcut[0])]
        assert pools == ([False, False] if i == 0 else [True, True])
    block = tower.stages[1][0].eval()
    randomize_norms(block)
    x = torch.rand(1, block.conv1.in_channels, 8, 8)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]).remainder(2) * 2.0 - 1  # +-1
    with torch.no_grad():
        torch.testing.assert_close(block.shortcut(x + checker), block.shortcut(x), atol=1e-6, rtol=0)
        plain = nn.Conv2d(block.conv1.in_channels, 4, 1, stride=2, bias=False)
        assert not torch.allclose(plain(x + checker), plain(x))


def test_attention_pool_queries_with_the_mean():
    """The pooled vector is one attention read-out whose query is the mean cell (with its
    position): equal to torch's multi-head attention over [mean; cells], token 0; and with equal
    positions for every cell, it does not depend on the cells' order."""
    torch.manual_seed(0)
    pool = AttentionPool(dim=24, heads=3, cells=9, out_dim=10).eval()
    features = torch.randn(2, 24, 3, 3)
    with torch.no_grad():
        pooled, tokens = pool(features)
        seq = tokens.transpose(0, 1)  # [1 + cells, B, C]
        k_w, v_w = pool.kv.weight.chunk(2)
        reference, _ = F.multi_head_attention_forward(
            query=seq, key=seq, value=seq, embed_dim_to_check=24, num_heads=3,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q.bias, pool.kv.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.out.weight, out_proj_bias=pool.out.bias, training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=pool.q.weight, k_proj_weight=k_w, v_proj_weight=v_w,
        )  # fmt: skip
        torch.testing.assert_close(pooled, reference[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(tokens[:, 0], features.flatten(2).mean(-1) + pool.pos_embed[0])
        pool.pos_embed[1:] = pool.pos_embed[1]
        shuffled = features.flatten(2)[..., torch.randperm(9)].view_as(features)
        torch.testing.assert_close(pool(shuffled)[0], pool(features)[0], atol=1e-6, rtol=0)


def test_only_clip_builds_a_resnet_and_bad_configs_are_named():
    with pytest.raises(ValueError, match="vision.kind 'resnet'.*only CLIP"):
        vlp.create_model("siglip", {"embed_dim": 256, "vision": {"kind": "resnet"}})
    with pytest.raises(ValueError, match="vision.kind must be one of"):
        vlp.create_model("clip", {"vision": {"kind": "convnext"}})
    with pytest.raises(ValueError, match="even width"):
        resnet(width=15)
    with pytest.raises(ValueError, match="below a ResNet tower's stride"):
        resnet(image_size=16)
    with pytest.raises(vlp.config.ConfigError, match="list of 4 items"):
        vlp.create_model("clip", {"vision": {"kind": "resnet", "stages": [1, 1, 1]}})


RN_TINY = {"kind": "resnet", "image_size": 32, "width": 8, "stages": [1, 1, 1, 1], "heads": 4}


@pytest.fixture
def rn_config(tmp_path, tiny_config):
    """The tests' tiny CLIP config with a ResNet image tower."""
    config = yaml.safe_load(tiny_config.read_text())
    config["model"]["vision"] = RN_TINY
    path = tmp_path / "rn.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resnet_clip_trains_saves_loads_and_evaluates(tmp_path, rn_config, shapes_dir):
    """On the shapes world the loss falls; the run's checkpoint holds the BatchNorm statistics
    (vlp.load gives the trained model's eval-mode embeddings); zero-shot and retrieval run."""
    from vlp.eval.run import evaluate
    from vlp.train.trainer import Trainer

    cfg = load_run_config("clip", rn_config, ["train.steps=30", "train.log_every=10", "train.ckpt_every=30"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and (losses[-1] + losses[-2]) / 2 < 0.85 * losses[0], losses
    loaded = vlp.load(tmp_path / "run")
    assert loaded.visual.norm1.num_batches_tracked.item() == 30
    images = torch.randn(3, 3, 32, 32)
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), trained.encode_image(images), atol=1e-6, rtol=0)
    results = evaluate(loaded, shapes_dir, tasks=["zeroshot", "retrieval"])
    assert 0 <= results["zeroshot"]["shape_top1"] <= 100 and "i2t_R@1" in results["retrieval"]


def test_shipped_rn_tiny_config_builds():
    cfg = load_run_config("clip", recipe_config_path("clip", "rn_tiny"))
    model = vlp.create_model("clip", cfg.model)
    with torch.no_grad():
        emb = model.eval().encode_image(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
