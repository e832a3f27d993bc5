import pytest
import torch

from vlp.config import ConfigError, apply_overrides, from_dict, load_run_config
from vlp.nn.attention import causal_mask
from vlp.nn.text import TextConfig, TextTransformer
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
    model = TextTransformer(TextConfig(vocab_size=30, context_length=8, width=32, layers=2, heads=2,
                                       causal=False, pool="cls"))
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
        from_dict(__import__("vlp.models.clip", fromlist=["CLIPConfig"]).CLIPConfig,
                  {"vision": {"widht": 3}}, where="model.")
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
