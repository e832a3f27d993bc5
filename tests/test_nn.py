import math

import pytest
import torch

from vlp.config import ConfigError, apply_overrides, from_dict, load_run_config
from vlp.nn.attention import KVCache, causal_mask
from vlp.nn.heads import clamped_scale, log_temperature
from vlp.nn.text import TextConfig, TextTransformer, tie_except_self_attention
from vlp.nn.tokens import cap_new_tokens, require_tokens
from vlp.nn.vit import VisionConfig, VisionTransformer


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_vit_shapes(stem):
    cfg = VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=3, stem=stem)
    pooled, tokens = VisionTransformer(cfg)(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 48) and tokens.shape == (2, 1 + 16, 48)


def test_conv_stem_needs_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(VisionConfig(image_size=36, patch_size=6, width=32, layers=1, heads=2, stem="conv"))


def test_causal_text_ignores_future_tokens():
    torch.manual_seed(0)
    model = TextTransformer(TextConfig(vocab_size=30, context_length=8, width=32, layers=2, heads=2))
    ids = torch.randint(0, 30, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 30
    mask = torch.ones(1, 8, dtype=torch.long)
    _, a = model(ids, mask)
    _, b = model(changed, mask)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_bidirectional_text_ignores_padding_content():
    torch.manual_seed(0)
    model = TextTransformer(
        TextConfig(vocab_size=30, context_length=8, width=32, layers=2, heads=2, causal=False, pool="cls")
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    ids = torch.randint(0, 30, (1, 8))
    other = ids.clone()
    other[0, 4:] = 0
    torch.testing.assert_close(model(ids, mask)[0], model(other, mask)[0])
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 30  # a real token after the CLS does change the CLS output
    assert not torch.allclose(model(ids, mask)[0], model(changed, mask)[0])


def test_causal_mask():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.vision\.widht"):
        from_dict(
            __import__("vlp.models.clip", fromlist=["CLIPConfig"]).CLIPConfig, {"vision": {"widht": 3}}, where="model."
        )
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        load_run_config("clip", overrides=["train.steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config("clip", tmp_path / "missing.yaml")


def test_overrides_reach_nested_fields():
    cfg = load_run_config("clip", overrides=["train.lr=0.01", "model.vision.layers=1", "data.crop_scale=[0.5,1]"])
    assert cfg.train.lr == 0.01 and cfg.model["vision"]["layers"] == 1
    assert cfg.data.crop_scale == (0.5, 1.0)


def _decoder(**overrides) -> TextTransformer:
    cfg = dict(
        vocab_size=30,
        context_length=12,
        width=32,
        layers=3,
        heads=2,
        causal=True,
        cross_attention_every=1,
        context_dim=24,
        pre_norm=False,
        embed_norm=True,
    )
    return TextTransformer(TextConfig(**{**cfg, **overrides}))


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = _decoder().eval()
    ids, context = torch.randint(0, 30, (2, 9)), torch.randn(2, 5, 24)
    mask = torch.ones_like(ids)
    _, full = model(ids, mask, context=context)
    cache, steps = KVCache(), []
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 9)):  # a prompt, single tokens, a chunk
        steps.append(model(ids[:, start:stop], mask[:, start:stop], context=context, cache=cache)[1])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9
    cache.reorder(torch.tensor([1, 1]))
    assert all(t.shape[0] == 2 for entry in cache.entries.values() for t in entry.values())


@pytest.mark.parametrize("start, every, expected", [(0, 1, [0, 1, 2, 3]), (2, 1, [2, 3]), (0, 2, [0, 2]), (0, 0, [])])
def test_cross_attention_layout(start, every, expected):
    model = _decoder(layers=4, cross_attention_every=every, cross_attention_from=start)
    assert [i for i, b in enumerate(model.transformer.blocks) if b.cross_attn is not None] == expected


def test_context_rows_equal_repeated_context_in_values_and_gradients():
    """Cross-attending through `context_rows` (each image projected once, as the ITM batch does)
    gives the outputs and gradients of materialising the repeated context."""
    torch.manual_seed(0)
    model = _decoder(causal=False, pool="cls")
    ids, rows = torch.randint(0, 30, (5, 6)), torch.tensor([0, 1, 1, 2, 0])
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    results = []
    for by_rows in (True, False):
        context = torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(1)).requires_grad_()
        kwargs = {"context": context, "context_rows": rows} if by_rows else {"context": context[rows]}
        out = model(ids, mask, **kwargs)[1]
        out.square().sum().backward()
        results.append((out.detach(), context.grad, model.transformer.blocks[0].cross_attn.kv.weight.grad.clone()))
        model.zero_grad()
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_layer_slices_compose():
    """ALBEF runs the text half, then the fusion half on its output: same as one full run."""
    torch.manual_seed(0)
    model = _decoder(layers=4, cross_attention_from=2, causal=False, pool="cls").eval()
    ids, context = torch.randint(0, 30, (2, 7)), torch.randn(2, 5, 24)
    mask = torch.ones_like(ids)
    _, text = model(ids, mask, layers=slice(0, 2))
    _, fused = model(ids, mask, context=context, hidden=text, layers=slice(2, None))
    torch.testing.assert_close(fused, model(ids, mask, context=context)[1])
    _, alone = model(ids, mask)  # no context: the cross-attention is skipped
    assert not torch.allclose(alone, fused)


def test_decoder_shares_all_but_self_attention():
    encoder, decoder = _decoder(causal=False, pool="cls"), _decoder()
    tie_except_self_attention(encoder, decoder)
    enc_params = {id(p) for p in encoder.parameters()}
    separate = {name for name, p in decoder.named_parameters() if id(p) not in enc_params}
    assert separate and all(".attn." in name or ".norm1." in name for name in separate)
    assert len(separate) == 3 * 6  # per layer: qkv and out (weight, bias), norm1 (weight, bias)


def test_contrastive_temperature_starts_at_clip_value_and_is_clamped():
    """CLIP Sec. 2.5: T = 0.07 at the start (a logit scale of 1/0.07), the scale clamped."""
    logit_scale = log_temperature(0.07)
    assert isinstance(logit_scale, torch.nn.Parameter) and logit_scale.shape == ()
    torch.testing.assert_close(clamped_scale(logit_scale, 100.0), torch.tensor(1 / 0.07))
    with torch.no_grad():
        logit_scale.fill_(math.log(500.0))
    assert clamped_scale(logit_scale, 100.0).item() == 100.0
    torch.testing.assert_close(clamped_scale(logit_scale, 1000.0), torch.tensor(500.0))


def test_require_tokens_names_the_missing_ids():
    require_tokens({"pad": 0, "cls": 1, "sep": 2}, ("pad", "cls"))
    with pytest.raises(ValueError, match=r"lacks the ids of \['mask', 'sep'\] \(the tokenizer's\)"):
        require_tokens({"pad": 0, "cls": 1}, ("pad", "sep", "mask"))


def test_new_tokens_capped_at_the_room_the_prompt_leaves():
    assert cap_new_tokens({}, 32, 4) == {"max_new_tokens": 20, "min_new_tokens": 0}
    capped = cap_new_tokens({"max_new_tokens": 30, "min_new_tokens": 10, "num_beams": 3}, 16, 10)
    assert capped == {"max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 3}
