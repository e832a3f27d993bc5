"""transformers' BLIP checkpoints (retrieval, captioning, VQA) load into vlp with the same ITC/ITM
scores, caption logits and generated tokens (tiny random models, built offline)."""

import pytest
import torch

import vlp
from vlp.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SHAPES = [
    dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
        vision=dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
        ),
        image_text_hidden_size=24,
    ),
    dict(
        text=dict(hidden_size=36, intermediate_size=72, num_hidden_layers=3, num_attention_heads=3),
        vision=dict(
            hidden_size=40,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=5,
            image_size=48,
            patch_size=16,
        ),
        image_text_hidden_size=20,
    ),
]


@pytest.fixture
def tokenizer(shapes_dir) -> Tokenizer:
    return Tokenizer.load(shapes_dir)


def save_hf_blip(cls_name: str, shape: dict, tokenizer: Tokenizer, path) -> torch.nn.Module:
    text = dict(
        shape["text"],
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=32,
        bos_token_id=tokenizer.dec_id,
        sep_token_id=tokenizer.sep_id,
        pad_token_id=tokenizer.pad_id,
    )
    config = transformers.BlipConfig(
        text_config=text, vision_config=shape["vision"], image_text_hidden_size=shape["image_text_hidden_size"]
    )
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(path)
    tokenizer.save(path)
    return model


def inputs(model, tokenizer: Tokenizer, first: int | None = None):
    size = model.cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = tokenizer(["a red circle", "a small blue square left of a green triangle"], style="bert")
    ids = text["input_ids"].clone()
    if first is not None:
        ids[:, 0] = first
    return images, ids, text["attention_mask"]


@pytest.mark.parametrize("shape", SHAPES)
def test_retrieval_checkpoint_gives_equal_itc_and_itm(tmp_path, tokenizer, shape):
    hf = save_hf_blip("BlipForImageTextRetrieval", shape, tokenizer, tmp_path)
    model = vlp.load(tmp_path)
    assert model.recipe == "blip" and model.objectives == {"itc", "itm"}
    images, ids, mask = inputs(model, tokenizer)
    enc_ids = ids.clone()
    enc_ids[:, 0] = tokenizer.enc_id  # BLIP's ITM input starts with [ENC] (vlp adds it itself)
    with torch.no_grad():
        itm = hf(input_ids=enc_ids, attention_mask=mask, pixel_values=images, use_itm_head=True).itm_score
        itc = hf(input_ids=ids, attention_mask=mask, pixel_values=images, use_itm_head=False).itm_score
        tokens = model.visual(images)[1]
        torch.testing.assert_close(model.itm_logits(tokens, ids, mask), itm, atol=1e-5, rtol=0)
        cosine = model.encode_image(images) @ model.encode_text(ids, mask).T
        torch.testing.assert_close(cosine, itc, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_captioning_checkpoint_gives_equal_logits_and_greedy_tokens(tmp_path, tokenizer, shape):
    hf = save_hf_blip("BlipForConditionalGeneration", shape, tokenizer, tmp_path)
    model = vlp.load(tmp_path)
    assert model.objectives == {"lm"} and model.eval_tasks == ("caption",)
    images, ids, mask = inputs(model, tokenizer, first=tokenizer.dec_id)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, pixel_values=images).logits
        ours = model.caption_logits(model.visual(images)[1], ids, mask)
        real = mask.bool()  # a causal decoder's outputs at padding positions are never used
        torch.testing.assert_close(ours[real], logits[real], atol=1e-5, rtol=0)
        expected = hf.generate(pixel_values=images, max_new_tokens=8, do_sample=False, num_beams=1)
        generated = model.generate(images, method="greedy", max_new_tokens=8)
    assert torch.equal(generated[:, : expected.shape[1]], expected)


def test_vqa_checkpoint_gives_equal_answers(tmp_path, tokenizer):
    # transformers sizes the answer decoder's cross-attention by the image width although it
    # attends to question states: the two widths must agree (as at BLIP's base size, 768).
    shape = dict(SHAPES[0], text=dict(SHAPES[0]["text"], hidden_size=48, num_attention_heads=3))
    hf = save_hf_blip("BlipForQuestionAnswering", shape, tokenizer, tmp_path)
    model = vlp.load(tmp_path)
    assert model.recipe == "blip_vqa"
    images, ids, mask = inputs(model, tokenizer, first=tokenizer.enc_id)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=5)
        answers = model.answer(images, ids, mask, max_new_tokens=5)
    assert torch.equal(answers[:, : expected.shape[1]], expected)


def test_blip_checkpoint_missing_a_layer_is_an_error(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from vlp.interop.mapping import CheckpointMismatch

    save_hf_blip("BlipForImageTextRetrieval", SHAPES[0], tokenizer, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"blocks\.1\.cross_attn\.kv\.weight"):
        vlp.load(tmp_path)


def test_captioning_checkpoint_converts_and_captions_from_the_command_line(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from vlp.cli import app
    from vlp.data.shapes import ShapesWorld
    from vlp.interop.blip import absent

    save_hf_blip("BlipForConditionalGeneration", SHAPES[0], tokenizer, tmp_path / "hf")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    loaded, converted = vlp.load(tmp_path / "hf"), vlp.load(tmp_path / "run")
    a, b = loaded.state_dict(), converted.state_dict()
    held = [
        k for k in a if not k.startswith(absent(loaded, "BlipForConditionalGeneration"))
    ]  # the rest is a fresh initialisation
    assert a.keys() == b.keys() and held and all(torch.equal(a[k], b[k]) for k in held)
    image = tmp_path / "image.png"
    ShapesWorld(image_size=32).sample("test", 0).image.save(image)
    captions = [
        runner.invoke(app, ["caption", str(where), str(image), "--decoding", "greedy"]).output
        for where in (tmp_path / "hf", tmp_path / "run")
    ]
    assert captions[0] == captions[1] and captions[0].startswith(str(image))
    result = runner.invoke(app, ["convert", str(tmp_path / "run"), str(tmp_path / "back"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    original = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    back = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("task", ["retrieval", "captioning"])
def test_vlp_blip_saves_for_transformers(tmp_path, tokenizer, task):
    """A vlp BLIP (ITC + ITM + LM, decoder sharing the encoder's weights) written as one of
    transformers' task models gives the same scores there."""
    from vlp.config import RunConfig
    from vlp.models.registry import build_model

    text = {
        "context_length": 32,
        "width": 32,
        "layers": 2,
        "heads": 2,
        "causal": False,
        "pool": "cls",
        "pre_norm": False,
        "embed_norm": True,
        "eps": 1e-12,
        "cross_attention_every": 1,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "width": 48,
        "layers": 2,
        "heads": 3,
        "ln_pre": False,
        "patch_bias": True,
    }
    torch.manual_seed(0)
    model = build_model(
        RunConfig(
            recipe="blip", model={"vision": vision, "text": text, "contrastive": {"embed_dim": 24, "momentum": 0}}
        ),
        tokenizer,
    ).eval()
    model.tokenizer = tokenizer
    with pytest.raises(ValueError, match="task="):
        vlp.save(model, tmp_path / "ambiguous", format="hf")
    vlp.save(model, tmp_path / "hf", format="hf", task=task)
    images, ids, mask = inputs(model, tokenizer)
    with torch.no_grad():
        tokens = model.visual(images)[1]
        if task == "retrieval":
            hf = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
            ids[:, 0] = tokenizer.enc_id
            expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, use_itm_head=True).itm_score
            torch.testing.assert_close(model.itm_logits(tokens, ids, mask), expected, atol=1e-5, rtol=0)
        else:
            hf = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
            ids[:, 0] = tokenizer.dec_id
            expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images).logits
            real = mask.bool()
            torch.testing.assert_close(model.caption_logits(tokens, ids, mask)[real], expected[real], atol=1e-5, rtol=0)
