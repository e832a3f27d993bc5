"""transformers' Blip2ForConditionalGeneration (OPT) loads as vlp's blip2_stage2 with the same
visual prompt and the same greedy captions (a tiny random model, built offline)."""

import json

import pytest
import torch
from tokenizers import processors

import vlp
from vlp.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def save_tiny_blip2(path, tokenizer: Tokenizer, image_token: int, frequency: int = 2):
    lm = transformers.OPTConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=40,
        word_embed_proj_dim=32,
        bos_token_id=tokenizer.sot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
    )
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            cross_attention_frequency=frequency,
            encoder_hidden_size=24,
        ),
        text_config=lm.to_dict(),
        num_query_tokens=3,
        image_token_index=image_token,
    )
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    # An OPT-like tokenizer: the start token before every text.
    library = tokenizer._tok
    library.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", tokenizer.sot_id)]
    )
    library.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "[PAD]",
            }
        )
    )
    return model


@pytest.mark.parametrize("frequency", [1, 2])
def test_blip2_opt_checkpoint_gives_equal_visual_prompt_and_captions(tmp_path, shapes_dir, frequency):
    tokenizer = Tokenizer.load(shapes_dir)
    hf = save_tiny_blip2(tmp_path, tokenizer, image_token=tokenizer.mask_id, frequency=frequency)
    model = vlp.load(tmp_path)
    assert model.recipe == "blip2_stage2" and model.cfg.qformer.num_queries == 3
    crossing = [b.cross_attn is not None for b in model.qformer.text.transformer.blocks]
    assert crossing == [True, frequency == 1, True]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_embeds = hf.vision_model(images).last_hidden_state
        queries = hf.qformer(
            query_embeds=hf.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        )
        expected = hf.language_projection(queries.last_hidden_state)
        torch.testing.assert_close(model.visual_prompt(images), expected, atol=1e-5, rtol=0)
        generated = hf.generate(pixel_values=images, max_new_tokens=6, do_sample=False, num_beams=1)
    new_tokens = generated[:, 3 + 1 :]  # after the 3 image tokens and the start token
    texts = [t.strip() for t in model.lm_tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    assert vlp.caption(model, images, method="greedy", max_new_tokens=6) == texts


def test_blip2_checkpoint_missing_a_query_weight_is_named(tmp_path, shapes_dir):
    from safetensors.torch import load_file, save_file

    from vlp.interop.mapping import CheckpointMismatch

    tokenizer = Tokenizer.load(shapes_dir)
    save_tiny_blip2(tmp_path, tokenizer, image_token=tokenizer.mask_id)
    state = load_file(tmp_path / "model.safetensors")
    del state["qformer.encoder.layer.2.crossattention.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"blocks\.2\.cross_attn\.out\.weight"):
        vlp.load(tmp_path)
