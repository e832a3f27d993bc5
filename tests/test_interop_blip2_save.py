"""Saving BLIP-2 for transformers: stage 1 as `Blip2ForImageTextRetrieval`, stage 2 (with its
frozen OPT) as `Blip2ForConditionalGeneration`. Tiny random models with odd sizes (3 heads,
MLP widths no multiple of the width, 5 queries, a vision tower of 3 blocks run to its second),
built offline; every weight randomised so that no output is trivially equal."""

import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file
from tokenizers import processors

import vlp
from vlp.data.tokenizer import Tokenizer
from vlp.models.registry import recipe_classes

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=32)
QFORMER = dict(hidden_size=30, intermediate_size=46, num_hidden_layers=3, num_attention_heads=3, encoder_hidden_size=36)
QUERIES = 5


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight drawn at random (transformers' BLIP-2 initialises its tower near zero);
    LayerNorm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (p.ndim == 1 and name.endswith("weight")))
    return model.eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def texts(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(["a small red circle", "two blue squares and a green one"], max_length=12)
    return batch["input_ids"], batch["attention_mask"]


def hf_queries(hf, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features after `post_layernorm`, Q-Former query outputs) of a transformers BLIP-2."""
    feats = hf.vision_model(pixels).last_hidden_state
    queries = hf.qformer(
        query_embeds=hf.query_tokens.expand(len(pixels), -1, -1),
        encoder_hidden_states=feats,
        encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long),
    ).last_hidden_state
    return feats, queries


def assert_same_stage1(model, hf, tokenizer: Tokenizer) -> None:
    """Vision features, query outputs, ITC similarities and ITM logits within 1e-5."""
    pixels, (ids, mask) = images(), texts(tokenizer)
    with torch.no_grad():
        feats, queries = hf_queries(hf, pixels)
        torch.testing.assert_close(model.image_features(pixels), feats, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.qformer(feats)[0], queries, atol=1e-5, rtol=0)
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        ours = model.embedding_similarity(model.encode_image(pixels), model.encode_text(ids, mask))
        torch.testing.assert_close(ours, itc, atol=1e-5, rtol=0)
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        torch.testing.assert_close(model.itm_logits(feats, ids, mask), itm.logits_per_image, atol=1e-5, rtol=0)
    assert min(queries.std(), itc.std(), itm.logits_per_image.std()) > 0.01  # nothing trivially equal


def assert_same_weights(a, b) -> None:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:8]


def test_retrieval_checkpoint_round_trips_through_vlp(tmp_path, shapes_dir):
    """transformers -> vlp blip2_stage1 (equal outputs) -> transformers (bit-equal weights)."""
    tokenizer = Tokenizer.load(shapes_dir)
    config = transformers.Blip2Config(
        vision_config={**VISION, "patch_size": 8},
        qformer_config={**QFORMER, "vocab_size": tokenizer.vocab_size, "use_qformer_text_input": True},
        num_query_tokens=QUERIES,
        image_text_hidden_size=14,
    )
    hf = randomise(transformers.Blip2ForImageTextRetrieval(config))
    hf.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    model = vlp.load(tmp_path / "hf")
    assert model.recipe == "blip2_stage1" and model.objectives == {"itc", "itm"}
    assert_same_stage1(model, hf, tokenizer)
    vlp.save(model, tmp_path / "back", format="hf")
    assert_same_weights(tmp_path / "hf", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_vlp_stage1_saves_as_retrieval_model_and_says_itg_is_left(tmp_path, shapes_dir):
    """A vlp stage 1 trained with ITC, ITM and ITG (tower read at its penultimate block): the
    transformers model gives its outputs; the ITG head is named as not saved."""
    tokenizer = Tokenizer.load(shapes_dir)
    model = vlp.create_model(
        "blip2_stage1",
        {
            "vision": {"image_size": 32, "patch_size": 8, "width": 36, "layers": 3, "heads": 3, "mlp_dim": 50}
            | {"ln_pre": False, "patch_bias": True, "act": "gelu", "eps": 1e-6},
            "qformer": {"width": 30, "layers": 3, "heads": 3, "mlp_dim": 46, "num_queries": QUERIES}
            | {"vocab_size": tokenizer.vocab_size, "context_length": 24, "cross_attention_every": 2},
            "embed_dim": 14,
            "tokens": tokenizer.special_ids(),
        },
        tokenizer=tokenizer,
    )
    randomise(model)
    with pytest.warns(UserWarning, match="lm_head.dense"):
        vlp.save(model, tmp_path / "hf", format="hf")
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vision_config.num_hidden_layers == 2  # the unused last block is not written
    assert_same_stage1(model, hf, tokenizer)


def opt_config(tokenizer: Tokenizer) -> "transformers.OPTConfig":
    return transformers.OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=30,
        num_hidden_layers=2,
        ffn_dim=46,
        num_attention_heads=3,
        max_position_embeddings=40,
        word_embed_proj_dim=30,
        bos_token_id=tokenizer.sot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
    )


def write_lm_tokenizer(path, tokenizer: Tokenizer) -> None:
    """An OPT-like transformers tokenizer: the start token before every text."""
    library = tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())  # a copy: the shapes tokenizer stays BERT-style
    library.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", tokenizer.sot_id)]
    )
    path.mkdir(parents=True, exist_ok=True)
    library.save(str(path / "tokenizer.json"))
    names = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "[PAD]"}
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names}))


def hf_logits(hf, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_token: int) -> torch.Tensor:
    """transformers' BLIP-2 logits: `image_token` placeholders, then the text."""
    queries = torch.full((len(ids), QUERIES), image_token)
    full_mask = torch.cat([torch.ones_like(queries), mask], dim=1)
    return hf(pixel_values=pixels, input_ids=torch.cat([queries, ids], 1), attention_mask=full_mask).logits


def lm_texts(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model._token_ids(["a small red circle", "two blue squares"], eos=True)


def test_opt_checkpoint_round_trips_through_vlp(tmp_path, shapes_dir):
    """Blip2ForConditionalGeneration (OPT) -> vlp blip2_stage2 (equal vision features, query
    outputs and LM logits) -> transformers: bit-equal weights, LM and LM tokenizer included."""
    tokenizer = Tokenizer.load(shapes_dir)
    config = transformers.Blip2Config(
        vision_config={**VISION, "patch_size": 8},
        qformer_config={**QFORMER, "cross_attention_frequency": 1},
        text_config=opt_config(tokenizer).to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=tokenizer.mask_id,
    )
    hf = randomise(transformers.Blip2ForConditionalGeneration(config))
    hf.save_pretrained(tmp_path / "hf")
    write_lm_tokenizer(tmp_path / "hf", tokenizer)
    model = vlp.load(tmp_path / "hf")
    assert model.cfg.image_token == tokenizer.mask_id
    pixels = images()
    ids, mask = lm_texts(model)
    with torch.no_grad():
        feats, queries = hf_queries(hf, pixels)
        torch.testing.assert_close(model.image_features(pixels), feats, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.qformer(feats)[0], queries, atol=1e-5, rtol=0)
        expected = hf_logits(hf, pixels, ids, mask, tokenizer.mask_id)
        torch.testing.assert_close(model.lm_output(pixels, ids, mask).logits, expected, atol=1e-5, rtol=0)
    vlp.save(model, tmp_path / "back", format="hf")
    assert_same_weights(tmp_path / "hf", tmp_path / "back")
    again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(again, pixels, ids, mask, tokenizer.mask_id), expected, atol=0, rtol=0)
    lm_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert lm_tok("a red circle")["input_ids"][0] == tokenizer.sot_id


def test_vlp_stage2_saves_with_its_lm_once_given_an_image_token(tmp_path, shapes_dir):
    """A vlp stage 2 (its own Q-Former, a frozen OPT) needs an image token to be written; then
    transformers gives its logits, and `vlp convert --to hf` writes the same directory."""
    from typer.testing import CliRunner

    from vlp.cli import app

    tokenizer = Tokenizer.load(shapes_dir)
    write_lm_tokenizer(tmp_path / "lm", tokenizer)
    lm = randomise(transformers.OPTForCausalLM(opt_config(tokenizer)), seed=2)
    model_cls, config_cls = recipe_classes("blip2_stage2")
    from vlp.config import from_dict

    cfg = from_dict(
        config_cls,
        {
            "vision": {"image_size": 32, "patch_size": 8, "width": 36, "layers": 3, "heads": 3, "mlp_dim": 50}
            | {"ln_pre": False, "patch_bias": True, "act": "gelu", "eps": 1e-6},
            "qformer": {"width": 30, "layers": 3, "heads": 3, "mlp_dim": 46, "num_queries": QUERIES}
            | {"vocab_size": tokenizer.vocab_size, "context_length": 24},
            "tokens": tokenizer.special_ids(),
        },
    )
    lm_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "lm")
    model = randomise(model_cls(cfg, tokenizer=tokenizer, lm=lm, lm_tokenizer=lm_tokenizer))
    with pytest.raises(ValueError, match="image_token"):
        vlp.save(model, tmp_path / "hf", format="hf")
    model.cfg.image_token = tokenizer.mask_id  # a token captions never contain
    vlp.save(model, tmp_path / "hf", format="hf")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vision_config.num_hidden_layers == 2 and hf.config.image_token_index == tokenizer.mask_id
    pixels = images()
    ids, mask = lm_texts(model)
    with torch.no_grad():
        expected = hf_logits(hf, pixels, ids, mask, tokenizer.mask_id)
        torch.testing.assert_close(model.lm_output(pixels, ids, mask).logits, expected, atol=1e-5, rtol=0)
    vlp.save(model, tmp_path / "run")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "run"), str(tmp_path / "cli"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "hf", tmp_path / "cli")
