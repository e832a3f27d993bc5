"""CLIP checkpoints of transformers and open_clip load into vlp with the same numerics, and
vlp CLIP models save back as transformers checkpoints (tiny random models, built offline)."""

import json

import pytest
import torch

import vlp
from vlp.data.tokenizer import Tokenizer
from vlp.interop.mapping import CheckpointMismatch

transformers = pytest.importorskip("transformers")

# Several shapes: odd head counts, MLP widths that are no multiple of the width, projection
# dims unlike either tower, both activations and LayerNorm eps.
HF_SHAPES = [
    dict(
        vision=dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=24,
        act="quick_gelu",
        eps=1e-5,
    ),
    dict(
        vision=dict(
            hidden_size=40,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=5,
            image_size=48,
            patch_size=16,
        ),
        text=dict(hidden_size=36, intermediate_size=72, num_hidden_layers=1, num_attention_heads=3),
        projection_dim=20,
        act="gelu",
        eps=1e-6,
    ),
]


def hf_clip(shape: dict, vocab: int, eos: int, context: int = 32) -> torch.nn.Module:
    common = dict(hidden_act=shape["act"], layer_norm_eps=shape["eps"])
    text = dict(
        shape["text"],
        vocab_size=vocab,
        max_position_embeddings=context,
        eos_token_id=eos,
        bos_token_id=eos - 1,
        pad_token_id=0,
        **common,
    )
    config = transformers.CLIPConfig(
        text_config=text, vision_config=dict(shape["vision"], **common), projection_dim=shape["projection_dim"]
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def captions_batch(tokenizer: Tokenizer, pad_to_max: bool = False) -> dict[str, torch.Tensor]:
    return tokenizer(
        ["a red circle", "a small blue square left of a green triangle", "two shapes"],
        max_length=32,
        style="clip",
        pad_to_max=pad_to_max,
    )


@pytest.fixture
def tokenizer(shapes_dir) -> Tokenizer:
    return Tokenizer.load(shapes_dir)


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_clip_loads_with_equal_embeddings_and_logits(tmp_path, tokenizer, shape):
    hf = hf_clip(shape, tokenizer.vocab_size, tokenizer.eot_id)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model = vlp.load(tmp_path / "hf")
    size = shape["vision"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = captions_batch(model.tokenizer)
    with torch.no_grad():
        ref = hf(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=images)
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(text["input_ids"], text["attention_mask"])
        logits = model.similarity(image_emb, text_emb)
    torch.testing.assert_close(image_emb, ref.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_emb, ref.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=0)
    assert model.scale().item() == pytest.approx(hf.logit_scale.exp().item())


def test_vlp_to_hf_to_vlp_round_trip_is_exact(tmp_path, tokenizer):
    hf = hf_clip(HF_SHAPES[0], tokenizer.vocab_size, tokenizer.eot_id)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model = vlp.load(tmp_path / "hf")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # something the HF init would not give
    vlp.save(model, tmp_path / "back", format="hf")
    reloaded_hf = transformers.CLIPModel.from_pretrained(tmp_path / "back")
    assert all(torch.equal(v, reloaded_hf.state_dict()[k]) for k, v in hf.state_dict().items() if k != "logit_scale")
    again = vlp.load(tmp_path / "back")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "clip"


def test_vlp_trained_clip_saves_for_transformers(tmp_path, tiny_config):
    from vlp.config import load_run_config
    from vlp.train.trainer import Trainer

    Trainer(load_run_config("clip", tiny_config), tmp_path / "run", progress=False).fit()
    model = vlp.load(tmp_path / "run")
    vlp.save(model, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32)
    text = captions_batch(model.tokenizer)
    with torch.no_grad():
        ref = hf(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=images)
        torch.testing.assert_close(model.encode_image(images), ref.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.encode_text(text["input_ids"], text["attention_mask"]), ref.text_embeds, atol=1e-5, rtol=0
        )


def test_a_vlp_run_converts_to_an_open_clip_directory(tmp_path, shapes_dir):
    """`vlp convert RUN OUT --to open_clip` (vlp.save(format="open_clip")): open_clip's own
    loader reads it and embeds as the run does; a recipe open_clip has no format for is named."""
    import open_clip
    from typer.testing import CliRunner

    from tests.conftest import tiny_clip
    from tests.test_fusion_models import model_config
    from vlp.cli import app

    run = vlp.save(tiny_clip(shapes_dir), tmp_path / "run")
    result = CliRunner().invoke(app, ["convert", str(run), str(tmp_path / "oc"), "--to", "open_clip"])
    assert result.exit_code == 0, result.output
    model, theirs = vlp.load(run), open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), theirs.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
    blip = vlp.create_model("blip", model_config("blip"))
    with pytest.raises(ValueError, match="recipe 'blip' has no open_clip format"):
        vlp.save(blip, tmp_path / "blip", format="open_clip")


def test_missing_and_unexpected_keys_are_named(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    hf_clip(HF_SHAPES[0], tokenizer.vocab_size, tokenizer.eot_id).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = state.pop("text_projection.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"text_proj\.weight.*extra\.weight"):
        vlp.load(tmp_path)
    with pytest.warns(UserWarning, match="1 missing key"):
        model = vlp.load(tmp_path, strict=False)
    assert model.tokenizer is None  # no tokenizer files in this directory


def test_unsupported_checkpoints_fail_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="llava.*not supported"):
        vlp.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        vlp.load(tmp_path / "nowhere" / "deeper")


def test_open_clip_loads_with_equal_embeddings(tmp_path, tokenizer):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": tokenizer.vocab_size, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(0)
    reference = open_clip.CLIP(
        model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"], quick_gelu=True
    ).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    tokenizer.save(tmp_path)
    model = vlp.load(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    # open_clip pads to its context length and pools the highest token id: give the end-of-text
    # token the top id of the batch.
    text = captions_batch(model.tokenizer, pad_to_max=True)
    ids = text["input_ids"].clone()
    ids[ids == tokenizer.eot_id] = tokenizer.vocab_size - 1
    padded = torch.where(text["attention_mask"].bool(), ids, torch.zeros_like(ids))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), reference.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            model.encode_text(padded, text["attention_mask"]),
            reference.encode_text(padded, normalize=True),
            atol=1e-5,
            rtol=0,
        )


def test_converted_checkpoint_fine_tunes_and_evaluates(tmp_path, tokenizer, shapes_dir):
    """HF checkpoint -> `vlp convert` -> `vlp train --init` on shapes data: the loss falls; and
    `vlp eval` runs on the HF directory itself."""
    from typer.testing import CliRunner

    from vlp.cli import app

    hf_clip(HF_SHAPES[0], tokenizer.vocab_size, tokenizer.eot_id).save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "converted")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "train",
            "clip",
            "--init",
            str(tmp_path / "converted"),
            "--data",
            str(shapes_dir),
            "--out",
            str(tmp_path / "tuned"),
            "--steps",
            "30",
            "--no-progress",
            "data.batch_size=16",
            "data.workers=0",
            "train.lr=1e-3",
            "train.warmup=2",
            "train.log_every=5",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in records if r.get("event") == "init")["missing"] == []
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-2:]) / 2 < 0.92 * losses[0], losses  # from chance, ln 16 = 2.77
    result = runner.invoke(
        app, ["eval", str(tmp_path / "hf"), "--data", str(shapes_dir), "--tasks", "retrieval", "--no-report"]
    )
    assert result.exit_code == 0, result.output
    assert "i2t_R@1" in json.loads((tmp_path / "hf" / "eval.json").read_text())["retrieval"]


def test_tokenizer_from_vocab_files_only(tmp_path, tokenizer):
    """A checkpoint that ships vocab.txt (no tokenizer.json) gets its tokenizer through transformers."""
    vocab = sorted(tokenizer._tok.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    from vlp.interop.pretrained import load_tokenizer

    loaded = load_tokenizer(tmp_path)
    text = ["a red circle left of a blue square"]
    assert torch.equal(loaded(text, style="bert")["input_ids"], tokenizer(text, style="bert")["input_ids"])


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tokenizer):
    hf = hf_clip(HF_SHAPES[0], tokenizer.vocab_size, tokenizer.eot_id)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = vlp.load(tmp_path / "single").state_dict(), vlp.load(tmp_path / "sharded").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_id_without_network_names_what_to_download(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-base-patch32.*huggingface-cli download"):
        vlp.load("openai/clip-vit-base-patch32")
