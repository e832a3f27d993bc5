import pytest

from vlp.config import ConfigError, TrainConfig, from_dict, load_run_config
from vlp.models.vlmo import VLMoConfig


def test_variable_length_tuples_keep_every_item():
    cfg = from_dict(VLMoConfig, {"objectives": ["itc", "itm", "mlm"]})
    assert cfg.objectives == ("itc", "itm", "mlm")  # tuple[str, ...]: once truncated to 2 items


def test_fixed_length_tuples_name_the_field_on_a_wrong_length():
    assert from_dict(TrainConfig, {"betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"train\.betas: expected a list of 2 items, got 3"):
        from_dict(TrainConfig, {"betas": [0.9, 0.95, 0.99]}, where="train.")
    with pytest.raises(ConfigError, match=r"train\.betas: expected a list"):
        from_dict(TrainConfig, {"betas": 0.9}, where="train.")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=0", "train.steps must be greater than 0, got 0"),
        ("data.batch_size=-4", "data.batch_size must be greater than 0, got -4"),
        ("train.ckpt_every=0", "train.ckpt_every must be greater than 0"),
        ("train.log_every=-1", "train.log_every must be greater than 0"),
        ("train.warmup=-1", "train.warmup must be 0 or more"),
        ("data.workers=-1", "data.workers must be 0 or more"),
        ("data.crop_scale=[0.5,0.2]", r"data.crop_scale must be \[low, high\] with 0 < low <= high <= 1"),
        ("data.crop_scale=[0.0,1.0]", r"data.crop_scale must be \[low, high\]"),
    ],
)
def test_out_of_bounds_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config("clip", overrides=[override])
    load_run_config("clip", overrides=["train.keep_checkpoints=0", "data.workers=0", "train.warmup=0"])
