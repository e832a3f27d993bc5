"""open_clip's ResNet CLIPs (RN50, ...) load into vlp's `vision.kind: resnet` with the same
embeddings, and vlp ResNet CLIPs save back for open_clip (tiny random models, built offline;
odd sizes; BatchNorm weights and running statistics randomised so that none is the identity)."""

import json

import pytest
import torch
from torch import nn

import vlp
from vlp.data.tokenizer import Tokenizer
from vlp.interop.pretrained import save_open_clip

open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Odd shapes: stage depths unlike any ResNet, a stem width that is no power of two, attention-pool
# heads of width 32 and 48, embeddings of 20 and 13, image sides of 48 and 96 (1x1 and 3x3
# final maps), both text activations.
SHAPES = [
    dict(
        embed_dim=20,
        quick_gelu=True,
        vision_cfg=dict(image_size=48, layers=[1, 2, 1, 1], width=24, head_width=32),
        text_cfg=dict(context_length=32, width=32, heads=2, layers=2, mlp_ratio=3.0),
    ),
    dict(
        embed_dim=13,
        quick_gelu=False,
        vision_cfg=dict(image_size=96, layers=[2, 1, 1, 2], width=18, head_width=48),
        text_cfg=dict(context_length=32, width=36, heads=3, layers=1),
    ),
]


@pytest.fixture
def tokenizer(shapes_dir) -> Tokenizer:
    return Tokenizer.load(shapes_dir)


def randomize_norms(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)


def open_clip_rn(shape: dict, vocab: int) -> nn.Module:
    cfg = {**shape, "text_cfg": {**shape["text_cfg"], "vocab_size": vocab}}
    torch.manual_seed(0)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"])
    randomize_norms(model)
    return model.eval(), cfg


def write_open_clip(model: nn.Module, cfg: dict, out, tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    tokenizer.save(out)


def text_batch(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions padded to the context with the end-of-text token given the batch's top id:
    open_clip pools the highest id, vlp the last real token (the same token here)."""
    text = tokenizer(["a red circle", "a small blue square left of a green triangle", "two shapes"],
                     max_length=32, style="clip", pad_to_max=True)  # fmt: skip
    ids = text["input_ids"].clone()
    ids[ids == tokenizer.eot_id] = tokenizer.vocab_size - 1
    return torch.where(text["attention_mask"].bool(), ids, torch.zeros_like(ids)), text["attention_mask"]


def assert_same_embeddings(model: nn.Module, reference: nn.Module, tokenizer: Tokenizer, size: int) -> None:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    ids, mask = text_batch(tokenizer)
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(images), model.encode_text(ids, mask)
        torch.testing.assert_close(image_emb, reference.encode_image(images, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(text_emb, reference.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
        logits = reference.logit_scale.exp() * reference.encode_image(images, normalize=True) @ text_emb.T
        torch.testing.assert_close(model.similarity(image_emb, text_emb), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_open_clip_resnet_loads_with_equal_embeddings(tmp_path, tokenizer, shape):
    reference, cfg = open_clip_rn(shape, tokenizer.vocab_size)
    assert type(reference.visual).__name__ == "ModifiedResNet"
    write_open_clip(reference, cfg, tmp_path, tokenizer)
    model = vlp.load(tmp_path)
    v = model.cfg.vision
    assert (v.kind, list(v.stages), v.width) == ("resnet", shape["vision_cfg"]["layers"], shape["vision_cfg"]["width"])
    assert v.heads == reference.visual.attnpool.num_heads and not model.training
    assert_same_embeddings(model, reference, tokenizer, shape["vision_cfg"]["image_size"])


@pytest.mark.parametrize("shape", SHAPES)
def test_vlp_to_open_clip_to_vlp_is_exact(tmp_path, tokenizer, shape):
    """A loaded checkpoint saved again is the same checkpoint, tensor for tensor (BatchNorm counts
    included), `open_clip.create_model("local-dir:...")` reads it, and vlp reads it back exactly."""
    reference, cfg = open_clip_rn(shape, tokenizer.vocab_size)
    write_open_clip(reference, cfg, tmp_path / "src", tokenizer)
    model = vlp.load(tmp_path / "src")
    save_open_clip(model, tmp_path / "back")
    written = safetensors_torch.load_file(tmp_path / "back" / "open_clip_model.safetensors")
    expected = reference.state_dict()
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    rebuilt = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert_same_embeddings(model, rebuilt, tokenizer, shape["vision_cfg"]["image_size"])
    again = vlp.load(tmp_path / "back")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vlp_resnet_clip_saves_for_open_clip(tmp_path, tokenizer):
    """A vlp-built ResNet CLIP (vlp's own init) has the same embeddings in open_clip."""
    torch.manual_seed(3)
    config = {
        "embed_dim": 22,
        "vision": {"kind": "resnet", "image_size": 64, "width": 20, "stages": [1, 1, 2, 1], "heads": 10},
        "text": {"vocab_size": tokenizer.vocab_size, "context_length": 32, "width": 24, "layers": 1, "heads": 3},
    }
    model = vlp.create_model("clip", config, tokenizer=tokenizer).eval()
    randomize_norms(model, seed=4)
    save_open_clip(model, tmp_path)
    reference = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    assert_same_embeddings(model, reference, tokenizer, 64)


def test_vit_clip_saves_for_open_clip_too(tmp_path, tokenizer):
    torch.manual_seed(5)
    tower = {"width": 24, "layers": 2, "heads": 3, "mlp_dim": 40, "act": "quick_gelu"}
    config = {
        "embed_dim": 10,
        "vision": {"image_size": 32, "patch_size": 8, **tower},
        "text": {"vocab_size": tokenizer.vocab_size, "context_length": 32, **tower},
    }
    model = vlp.create_model("clip", config, tokenizer=tokenizer).eval()
    save_open_clip(model, tmp_path)
    reference = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    assert_same_embeddings(model, reference, tokenizer, 32)
    again = vlp.load(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_what_a_format_cannot_express_is_named(tmp_path, tokenizer):
    config = {
        "vision": {"kind": "resnet", "image_size": 32, "width": 8, "stages": [1, 1, 1, 1], "heads": 4},
        "text": {"vocab_size": tokenizer.vocab_size, "width": 16, "layers": 1, "heads": 2, "eps": 1e-6},
    }
    model = vlp.create_model("clip", config, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="transformers' CLIPModel.*vision.kind"):  # no CLIP ResNet there
        vlp.save(model, tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="open_clip's CLIP.*text.eps"):
        save_open_clip(model, tmp_path / "oc")
    with pytest.raises(ValueError, match="square images only"):
        cfg = {**SHAPES[0], "vision_cfg": {**SHAPES[0]["vision_cfg"], "image_size": [48, 64]}}
        (tmp_path / "rect").mkdir()
        (tmp_path / "rect" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        vlp.load(tmp_path / "rect")


@pytest.mark.slow
def test_open_clip_rn50_loads_with_equal_embeddings(tmp_path, tokenizer):
    """Full size: `open_clip.create_model("RN50")` (random weights, offline) in vlp's rn50 shape."""
    torch.manual_seed(0)
    reference = open_clip.create_model("RN50").eval()
    randomize_norms(reference)
    cfg = open_clip.get_model_config("RN50")
    write_open_clip(reference, cfg, tmp_path, tokenizer)
    model = vlp.load(tmp_path)
    shipped = vlp.config.load_run_config("clip", vlp.config.recipe_config_path("clip", "rn50")).model
    assert model.cfg.vision == vlp.config.from_dict(vlp.models.clip.VisionConfig, shipped["vision"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), reference.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
