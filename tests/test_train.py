import json

import pytest
import torch
from safetensors.torch import load_file

from vlp.config import load_run_config
from vlp.train import checkpoint as ckpt
from vlp.train.trainer import Trainer


def final_weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def test_loss_falls(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config, ["train.steps=60", "train.log_every=10", "train.ckpt_every=60"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    assert (losses[-1] + losses[-2]) / 2 < 0.85 * losses[0]
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in records if "loss" in r)


def test_resume_is_exact(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config)
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    # Same run, "killed" after 3 steps, resumed with a DataLoader worker this time.
    Trainer(cfg, tmp_path / "resumed", progress=False).fit(stop_at=3)
    resumed_cfg = load_run_config("clip", tiny_config, ["data.workers=1"])
    Trainer(resumed_cfg, tmp_path / "resumed", resume=True, progress=False).fit()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # And a different seed really gives different weights (the comparison can fail).
    other = load_run_config("clip", tiny_config, ["train.seed=1"])
    Trainer(other, tmp_path / "other", progress=False).fit()
    other_weights = final_weights(tmp_path / "other")
    assert any(not torch.equal(straight[n], other_weights[n]) for n in straight)


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(load_run_config("clip", tiny_config), tmp_path / "empty", resume=True, progress=False)


def test_interrupted_checkpoint_write_keeps_last_good(tmp_path, tiny_config, monkeypatch):
    cfg = load_run_config("clip", tiny_config, ["train.steps=3"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    good = ckpt.latest_checkpoint(tmp_path / "run")
    assert good.name == "step_0000003"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "save_state", killed)
    trainer.step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer._save()
    assert ckpt.latest_checkpoint(tmp_path / "run") == good
    assert not (tmp_path / "run" / "checkpoints" / "step_0000004").exists()


def test_bf16_and_accumulation_run(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config, ["train.steps=2", "train.precision=bf16", "train.accum=2"])
    values = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert values["step"] == 2 and torch.isfinite(torch.tensor(values["loss"]))


def test_auto_precision_is_bf16_only_where_native_and_faster(monkeypatch):
    from vlp.train import precision

    cpu = torch.device("cpu")
    for native, speedup, expected in ((True, 2.0, "bf16"), (True, 0.5, "fp32"), (False, 2.0, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        assert precision.resolve_precision("auto", cpu) == expected
        assert precision.resolve_precision("bf16", cpu) == "bf16"  # asked for: kept (a warning where emulated)
    with pytest.raises(ValueError, match="fp16"):
        precision.resolve_precision("fp16", cpu)


def test_bf16_speedup_is_measured_from_matmuls():
    from vlp.train import precision

    assert precision.matmul_seconds(torch.float32, side=64, reps=2) > 0
    first = precision.cpu_bf16_speedup()
    assert first > 0 and precision.cpu_bf16_speedup() == first  # measured once per process


def test_no_weight_decay_on_norms_biases_embeddings(tmp_path, tiny_config):
    trainer = Trainer(load_run_config("clip", tiny_config), tmp_path / "run", progress=False)
    decayed = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
    for name, param in trainer.model.named_parameters():
        plain = name.endswith(("bias", "cls_token")) or "norm" in name or "embed" in name or name == "logit_scale"
        if "patch_embed" in name and name.endswith("weight"):
            plain = False
        assert (id(param) not in decayed) == plain, name
