"""SigLIP checkpoints of transformers and open_clip load into vlp with the same numerics (1e-5),
and vlp SigLIP models save back for both (tiny random models with odd sizes, built offline)."""

import json

import pytest
import torch

import vlp
from vlp.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Odd head counts, MLP widths that are no multiple of the width, both activations and eps.
HF_SHAPES = [
    dict(
        vision=dict(
            hidden_size=30,
            intermediate_size=43,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=24,
            patch_size=8,
        ),
        text=dict(hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=5),
        act="gelu_pytorch_tanh",
        eps=1e-6,
    ),
    dict(
        vision=dict(
            hidden_size=35,
            intermediate_size=70,
            num_hidden_layers=1,
            num_attention_heads=7,
            image_size=30,
            patch_size=10,
        ),
        text=dict(hidden_size=18, intermediate_size=29, num_hidden_layers=3, num_attention_heads=3),
        act="gelu",
        eps=1e-5,
    ),
]
CONTEXT = 16


def hf_siglip(shape: dict, tokenizer: Tokenizer) -> torch.nn.Module:
    common = dict(hidden_act=shape["act"], layer_norm_eps=shape["eps"])
    text = dict(
        shape["text"],
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=CONTEXT,
        projection_size=shape["vision"]["hidden_size"],
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.sot_id,
        eos_token_id=tokenizer.eot_id,
        **common,
    )
    config = transformers.SiglipConfig(text_config=text, vision_config=dict(shape["vision"], **common))
    torch.manual_seed(0)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # transformers initialises both to 0: give them values a mix-up would show
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-2.3)
    return model


@pytest.fixture
def tokenizer(shapes_dir) -> Tokenizer:
    return Tokenizer.load(shapes_dir)


def captions(tokenizer: Tokenizer, pad_to_max: bool) -> dict[str, torch.Tensor]:
    texts = ["a red circle", "a small blue square left of a green triangle", "two shapes"]
    return tokenizer(texts, max_length=CONTEXT, style="clip", pad_to_max=pad_to_max)


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_siglip_loads_with_equal_embeddings_and_logits(tmp_path, tokenizer, shape):
    hf = hf_siglip(shape, tokenizer)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model = vlp.load(tmp_path / "hf")
    pixels = images(shape["vision"]["image_size"])
    # SigLIP is used with captions padded to the context length and no mask (transformers' docs);
    # vlp pads the batch itself, so it gets the short batch with its mask.
    full, short = captions(tokenizer, True), captions(tokenizer, False)
    assert short["input_ids"].shape[1] < CONTEXT
    with torch.no_grad():
        ref = hf(input_ids=full["input_ids"], pixel_values=pixels)
        image_emb = model.encode_image(pixels)
        text_emb = model.encode_text(short["input_ids"], short["attention_mask"])
        logits = model.similarity(image_emb, text_emb)
    torch.testing.assert_close(image_emb, ref.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_emb, ref.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=0)


def test_vlp_to_hf_to_vlp_round_trip_is_exact(tmp_path, tokenizer):
    hf = hf_siglip(HF_SHAPES[0], tokenizer)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model = vlp.load(tmp_path / "hf")
    vlp.save(model, tmp_path / "back", format="hf")
    reloaded = transformers.SiglipModel.from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in hf.state_dict().items())
    again = vlp.load(tmp_path / "back")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "siglip"


def tiny_vlp_siglip(tokenizer: Tokenizer) -> torch.nn.Module:
    """A vlp SigLIP of the recipe's own defaults (init t' = log 10, b = -10), odd sizes."""
    torch.manual_seed(2)
    from vlp.models.siglip import SigLIPConfig, siglip_text_config, siglip_vision_config

    config = SigLIPConfig(
        embed_dim=30,
        vision=siglip_vision_config(image_size=24, patch_size=8, width=30, layers=2, heads=3, mlp_dim=43),
        text=siglip_text_config(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, width=20, layers=1, heads=5),
        tokens=tokenizer.special_ids(),
    )
    return vlp.create_model("siglip", config, tokenizer=tokenizer).eval()


def test_vlp_siglip_saves_for_transformers(tmp_path, tokenizer):
    model = tiny_vlp_siglip(tokenizer)
    vlp.save(model, tmp_path / "hf", format="hf")
    hf = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
    pixels, full, short = images(24), captions(tokenizer, True), captions(tokenizer, False)
    with torch.no_grad():
        ref = hf(input_ids=full["input_ids"], pixel_values=pixels)
        image_emb = model.encode_image(pixels)
        text_emb = model.encode_text(short["input_ids"], short["attention_mask"])
        torch.testing.assert_close(image_emb, ref.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_emb, ref.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.similarity(image_emb, text_emb), ref.logits_per_image, atol=1e-5, rtol=0)


# --- open_clip: a timm image tower named by a registered model, open_clip's text tower ----------


@pytest.fixture(scope="module")
def open_clip():
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if "vit_vlp_test_siglip" not in timm.list_models("vit_vlp_test_siglip"):

        @register_model
        def vit_vlp_test_siglip(pretrained: bool = False, **kwargs):
            args = dict(img_size=24, patch_size=8, embed_dim=30, depth=2, num_heads=3, mlp_ratio=43 / 30)
            args.update(class_token=False, global_pool="map")
            return _create_vision_transformer("vit_vlp_test_siglip", pretrained=pretrained, **{**args, **kwargs})

    return open_clip


def open_clip_dir(path, open_clip, tokenizer: Tokenizer, act_kwargs: dict | None) -> torch.nn.Module:
    """An open_clip SigLIP directory (config, safetensors, tokenizer) and its model."""
    from safetensors.torch import save_file

    text_cfg = {
        "context_length": CONTEXT,
        "vocab_size": tokenizer.vocab_size,
        "width": 20,
        "heads": 5,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "pad_id": tokenizer.pad_id,
        "norm_kwargs": {"eps": 1e-6},
    }
    if act_kwargs:
        text_cfg["act_kwargs"] = act_kwargs
    model_cfg = {
        "embed_dim": 30,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 24,
            "timm_model_name": "vit_vlp_test_siglip",
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text_cfg,
    }
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(0)
    reference = open_clip.create_model(f"local-dir:{path}").eval()
    with torch.no_grad():
        reference.logit_scale.fill_(1.3)
        reference.logit_bias.fill_(-4.0)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path / "open_clip_model.safetensors")
    tokenizer.save(path)
    return reference


def assert_same_as_open_clip(model, reference, tokenizer: Tokenizer) -> None:
    pixels, full, short = images(24), captions(tokenizer, True), captions(tokenizer, False)
    with torch.no_grad():
        image_emb = model.encode_image(pixels)
        text_emb = model.encode_text(short["input_ids"], short["attention_mask"])
        ref_image = reference.encode_image(pixels, normalize=True)
        ref_text = reference.encode_text(full["input_ids"], normalize=True)
        torch.testing.assert_close(image_emb, ref_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(text_emb, ref_text, atol=1e-5, rtol=0)
        ref_logits = reference.logit_scale.exp() * ref_image @ ref_text.T + reference.logit_bias
        torch.testing.assert_close(model.similarity(image_emb, text_emb), ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act_kwargs", [None, {"approximate": "tanh"}], ids=["siglip", "siglip2-act"])
def test_open_clip_siglip_loads_with_equal_embeddings(tmp_path, tokenizer, open_clip, act_kwargs):
    reference = open_clip_dir(tmp_path / "oc", open_clip, tokenizer, act_kwargs)
    model = vlp.load(tmp_path / "oc")
    assert model.recipe == "siglip" and model.cfg.text.act == ("gelu_tanh" if act_kwargs else "gelu")
    assert_same_as_open_clip(model, reference, tokenizer)


def test_vlp_siglip_saves_for_open_clip(tmp_path, tokenizer, open_clip):
    from vlp.interop.pretrained import save_open_clip

    reference = open_clip_dir(tmp_path / "oc", open_clip, tokenizer, None)
    model = vlp.load(tmp_path / "oc")
    with torch.no_grad():
        model.logit_bias.fill_(-6.5)  # something the checkpoint does not hold
    save_open_clip(model, tmp_path / "back")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    assert reloaded.logit_bias.item() == -6.5
    a, b = reference.state_dict(), reloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "logit_bias")
    assert_same_as_open_clip(model, reloaded, tokenizer)
    again = vlp.load(tmp_path / "back")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_tower_timm_cannot_name_is_refused_for_open_clip(tmp_path, tokenizer, open_clip):
    from vlp.interop.pretrained import save_open_clip

    model = tiny_vlp_siglip(tokenizer)  # MLP 43 wide but tanh GELU: no registered timm model
    with pytest.raises(ValueError, match="no registered timm SigLIP ViT"):
        save_open_clip(model, tmp_path / "out")
