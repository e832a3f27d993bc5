"""Training past one device's memory (docs/scale.md): activation checkpointing gives the same
gradients and the same run; the trainer turns it on from `train.grad_checkpointing`."""

import pytest
import torch
from test_fusion_models import batch, model_config
from test_train import final_weights

import vlp
from vlp.config import load_run_config
from vlp.nn.transformer import Block, set_grad_checkpointing
from vlp.train.trainer import Trainer

CLIP = {
    "embed_dim": 16,
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {"vocab_size": 60, "context_length": 16, "width": 32, "layers": 2, "heads": 2},
}


def losses_and_gradients(recipe: str, config: dict, checkpointed: bool):
    torch.manual_seed(0)
    model = vlp.create_model(recipe, config).train()
    assert set_grad_checkpointing(model, checkpointed) >= 2  # both towers (and fusion/decoder)
    torch.manual_seed(1)  # the same random draws inside the step (BLIP's hard negatives)
    losses = model(batch())
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in losses.items()}, grads


@pytest.mark.parametrize("recipe, config", [("clip", CLIP), ("albef", None), ("blip", None)])
def test_checkpointed_blocks_give_the_same_losses_and_gradients(recipe, config):
    config = config or model_config(recipe)
    plain_losses, plain_grads = losses_and_gradients(recipe, config, checkpointed=False)
    losses, grads = losses_and_gradients(recipe, config, checkpointed=True)
    assert losses.keys() == plain_losses.keys() and grads.keys() == plain_grads.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], plain_losses[name], rtol=0, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_recomputes_the_blocks_in_backward(monkeypatch):
    """The option really changes how the step runs: each block's forward runs twice."""
    calls = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    torch.manual_seed(0)
    model = vlp.create_model("clip", CLIP).train()
    for checkpointed, expected in ((False, 4), (True, 8)):  # 2 towers x 2 blocks
        calls.clear()
        set_grad_checkpointing(model, checkpointed)
        sum(model(batch()).values()).backward()
        assert len(calls) == expected
    with torch.no_grad():  # evaluation and momentum encoders run plainly
        calls.clear()
        model(batch())
        assert len(calls) == 4


def test_a_run_with_checkpointing_equals_one_without(tmp_path, tiny_config):
    plain = load_run_config("clip", tiny_config, ["train.steps=3"])
    Trainer(plain, tmp_path / "plain", progress=False).fit()
    checkpointed = load_run_config("clip", tiny_config, ["train.steps=3", "train.grad_checkpointing=true"])
    Trainer(checkpointed, tmp_path / "checkpointed", progress=False).fit()
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "checkpointed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
