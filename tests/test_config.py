import pytest

from vlp.config import ConfigError, TrainConfig, from_dict
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
