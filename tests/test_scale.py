"""Training past one device's memory (docs/scale.md): activation checkpointing gives the same
gradients and the same run; the trainer turns it on from `train.grad_checkpointing`."""

import json

import pytest
import torch
from conftest import torchrun_train
from test_fusion_models import batch, model_config
from test_train import final_weights
from typer.testing import CliRunner

import vlp
from vlp.cli import app
from vlp.config import ConfigError, load_run_config, recipe_config_path
from vlp.nn.transformer import Block, set_grad_checkpointing
from vlp.train.rundir import read_metrics
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


SIGLIP_TINY = [  # configs/siglip/tiny.yaml cut to the size of the tests' CLIP
    "model.embed_dim=32",
    "model.vision={image_size: 32, patch_size: 8, width: 32, layers: 2, heads: 2, class_token: false, pool: map}",
    "model.text={context_length: 32, width: 32, layers: 2, heads: 2, causal: false, pool: last}",
    "data.workers=0",
]


@pytest.mark.parametrize("recipe", ["clip", "siglip"])
def test_accumulated_contrastive_steps_equal_one_big_batch(tmp_path, tiny_config, shapes_dir, recipe):
    """With train.accum, CLIP's ITC (SigLIP's sigmoid loss) scores every micro-batch against
    the negatives of all of them (cached embeddings): 2 micro-batches of 8 train as 1 batch of
    16, not as 2 batches of 8 each seeing its own negatives."""

    def config(*overrides):
        if recipe == "clip":
            return load_run_config("clip", tiny_config, ["train.steps=3", *overrides])
        siglip = [*SIGLIP_TINY, f"data.path={shapes_dir}", "train.steps=3", "train.log_every=1", "train.precision=fp32"]
        return load_run_config("siglip", recipe_config_path("siglip"), [*siglip, *overrides])

    Trainer(config("data.batch_size=16"), tmp_path / "big", progress=False).fit()
    Trainer(config("data.batch_size=8", "train.accum=2"), tmp_path / "accumulated", progress=False).fit()
    a, b = final_weights(tmp_path / "big"), final_weights(tmp_path / "accumulated")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]
        for run in ("big", "accumulated")
    ]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_accumulation_over_two_ranks_equals_one_big_batch(tmp_path, tiny_config):
    """2 gloo ranks x 2 micro-batches of 8 per rank (the cached embeddings gathered across
    ranks, the gradients averaged) train as one process on batches of 32."""
    big = load_run_config("clip", tiny_config, ["train.steps=2", "data.batch_size=32"])
    Trainer(big, tmp_path / "big", progress=False).fit()
    args = ["--config", str(tiny_config), "--out", str(tmp_path / "ddp"), "--steps", "2", "--no-progress"]
    result = torchrun_train("clip", *args, "data.batch_size=8", "train.accum=2")  # batch_size is per rank
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(tmp_path / "big"), final_weights(tmp_path / "ddp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def board_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_shows_what_metrics_jsonl_holds_across_a_resume(tmp_path, tiny_config, shapes_dir):
    overrides = ["train.steps=4", "train.ckpt_every=2", "train.log_to=[jsonl,tensorboard]"]
    cfg = load_run_config("clip", tiny_config, overrides)
    Trainer(cfg, tmp_path / "run", progress=False).fit(stop_at=3)  # "killed" after step 3, checkpoint at 2
    Trainer(cfg, tmp_path / "run", resume=True, progress=False).fit()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    scalars = board_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]  # step 3 of the first try purged
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records])
    assert {"train/lr", "train/grad_norm", "train/samples_per_s"} <= set(scalars)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--data", str(shapes_dir), "--tasks", "zeroshot"])
    assert result.exit_code == 0, result.output
    top1 = json.loads((tmp_path / "run" / "eval.json").read_text())["zeroshot"]
    eval_tags = [tag for tag in board_scalars(tmp_path / "run") if tag.startswith("eval/zeroshot/")]
    assert eval_tags and top1


def test_log_to_must_keep_the_run_record(tiny_config):
    with pytest.raises(ConfigError, match="train.log_to must list jsonl"):
        load_run_config("clip", tiny_config, ["train.log_to=[tensorboard]"])
