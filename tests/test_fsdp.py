"""`train.parallel: fsdp` (FSDP2 + Distributed Checkpoint) against DDP, in 2 gloo processes on the CPU.

One torchrun launch per recipe trains every run the tests compare (this file is its driver, see
`__main__`), so the start-up of torch.distributed is paid once: DDP and FSDP runs of CLIP and
BLIP, with and without accumulation, an FSDP run "killed" (SIGKILL) after step 4 with its
checkpoint at step 3, and a bf16 FSDP run.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, torchrun_train
from safetensors.torch import load_file
from typer.testing import CliRunner

import vlp
from vlp.cli import app
from vlp.config import ConfigError, load_run_config
from vlp.train import checkpoint as ckpt
from vlp.train.rundir import RunError, read_metrics

BLIP_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {
        "context_length": 32,
        "width": 32,
        "layers": 2,
        "heads": 2,
        "causal": False,
        "pool": "cls",
        "pre_norm": False,
        "embed_norm": True,
        "eps": 1.0e-12,
        "cross_attention_every": 1,
    },
    "contrastive": {"embed_dim": 16, "momentum": 0.9, "queue_size": 64, "alpha_ramp_steps": 4},
}
STEPS = {"clip": 6, "blip": 3}


def config_file(tmp: Path, recipe: str, shapes_dir: Path) -> Path:
    """A tiny config of `recipe` (6 CLIP steps, 3 BLIP steps, a checkpoint every 3) on the shapes world."""
    config = {**TINY_CONFIG, "recipe": recipe, "data": {**TINY_CONFIG["data"], "path": str(shapes_dir)}}
    config["train"] = {**TINY_CONFIG["train"], "steps": STEPS[recipe]}
    if recipe == "blip":
        config["model"], config["data"]["batch_size"] = BLIP_MODEL, 8
    path = tmp / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def runs_of(recipe: str) -> dict[str, list[str]]:
    """name -> overrides of the runs one launch trains."""
    runs = {
        "ddp": [],
        "fsdp": ["train.parallel=fsdp"],
        "ddp_accum": ["train.accum=2", "train.steps=2"],
        "fsdp_accum": ["train.accum=2", "train.steps=2", "train.parallel=fsdp"],
    }
    if recipe == "clip":
        runs["fsdp_bf16"] = ["train.parallel=fsdp", "train.precision=bf16", "train.steps=2"]
        runs["killed"] = ["train.parallel=fsdp"]  # last: the launch ends with its kill
    return runs


def launch(tmp: Path, recipe: str, config: Path) -> Path:
    """Train `runs_of(recipe)` under torchrun (2 processes); returns the directory of the runs."""
    spec = tmp / f"{recipe}_spec.json"
    runs = runs_of(recipe)
    spec.write_text(json.dumps({"recipe": recipe, "config": str(config), "out": str(tmp), "runs": runs}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, __file__, str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    done = [name for name in runs if (tmp / name / "done").is_file()]
    assert done == [name for name in runs if name != "killed"], failure(result.stderr)
    return tmp


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory, shapes_dir):
    tmp = tmp_path_factory.mktemp("fsdp_clip")
    return launch(tmp, "clip", config_file(tmp, "clip", shapes_dir))


@pytest.fixture(scope="module")
def blip_runs(tmp_path_factory, shapes_dir):
    tmp = tmp_path_factory.mktemp("fsdp_blip")
    return launch(tmp, "blip", config_file(tmp, "blip", shapes_dir))


def failure(stderr: str) -> str:
    """What a failed torchrun launch says: every rank's error lines, then the end of its output."""
    errors = [line for line in stderr.splitlines() if "Error" in line and "[rank" in line]
    return "\n".join(errors[-20:]) + "\n...\n" + stderr[-2000:]


def losses(run: Path) -> list[dict[str, float]]:
    return [
        {k: v for k, v in r.items() if k not in ("steps_per_s", "samples_per_s")}
        for r in read_metrics(run / "metrics.jsonl")
        if "loss" in r
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_weights(ckpt.weights_of(run))


def assert_close_runs(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same logged values (losses, gradient norms) at every step and same final weights."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 0
    for ra, rb in zip(la, lb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, name
        assert torch.allclose(wa[name], wb[name], atol=atol, rtol=0), (name, (wa[name] - wb[name]).abs().max())


@pytest.mark.parametrize("run", ["", "_accum"])
def test_clip_fsdp_steps_equal_ddp_steps(clip_runs, run):
    """CLIP, 6 steps (2 with 2-way cached-embedding accumulation): every logged loss and gradient
    norm, and every updated weight, as under DDP (fp32; up to the order of float sums)."""
    assert (clip_runs / f"fsdp{run}" / "checkpoints" / "step_0000006" / ckpt.SHARDED).is_dir() or run
    assert not list((clip_runs / f"fsdp{run}").glob("checkpoints/*/model.safetensors"))
    assert_close_runs(clip_runs / f"ddp{run}", clip_runs / f"fsdp{run}")


@pytest.mark.parametrize("run", ["", "_accum"])
def test_blip_fsdp_steps_equal_ddp_steps(blip_runs, run):
    """BLIP (decoder tied to the encoder, momentum encoders, feature queues): losses, updated
    weights, the EMA copies and the queues as under DDP."""
    assert_close_runs(blip_runs / f"ddp{run}", blip_runs / f"fsdp{run}")
    names = weights(blip_runs / f"fsdp{run}")
    assert any(name.startswith("momentum.") for name in names) and "contrast.image_queue.features" in names


def test_fsdp_bf16_mixed_precision_trains_fp32_weights(clip_runs):
    """bf16 compute (MixedPrecisionPolicy), fp32 weights and optimizer state; the losses those of
    fp32 training to bf16's precision."""
    bf16, fp32 = losses(clip_runs / "fsdp_bf16"), losses(clip_runs / "fsdp")[:2]
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=2e-2)
    assert all(w.dtype == torch.float32 for w in weights(clip_runs / "fsdp_bf16").values())


def test_fsdp_killed_and_resumed_is_exact(clip_runs):
    """An FSDP run killed (SIGKILL) after step 4, resumed from its sharded step-3 checkpoint in 2
    processes: the same losses and bit-identical weights as the unbroken run."""
    killed = clip_runs / "killed"
    assert ckpt.latest_checkpoint(killed).name == "step_0000003"
    result = torchrun_train("clip", "--out", str(killed), "--resume", "--no-progress")
    assert result.returncode == 0, failure(result.stderr)
    resumed_losses, straight_losses = losses(killed), losses(clip_runs / "fsdp")
    assert resumed_losses == straight_losses, [(a, b) for a, b in zip(resumed_losses, straight_losses) if a != b]
    straight, resumed = weights(clip_runs / "fsdp"), weights(killed)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_convert_consolidates_a_sharded_run(clip_runs, tmp_path):
    """`vlp convert` (and `vlp.load`) turn a sharded run into an ordinary one: model.safetensors
    holding exactly the sharded weights, loading into the same model."""
    source = clip_runs / "fsdp"
    result = CliRunner().invoke(app, ["convert", str(source), str(tmp_path / "plain")])
    assert result.exit_code == 0, result.output
    plain = load_file(str(ckpt.weights_of(tmp_path / "plain")))
    sharded = weights(source)
    assert plain.keys() == sharded.keys() and all(torch.equal(plain[k], sharded[k]) for k in plain)
    a, b = vlp.load(source), vlp.load(tmp_path / "plain")
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.encode_image(images), b.encode_image(images))
    # the checkpoint directory itself is accepted too, as for ordinary runs
    assert ckpt.run_of(ckpt.latest_checkpoint(source)) == source


def test_single_process_fsdp_and_its_guards(tmp_path, tiny_config):
    """FSDP in one process (a one-rank group, ended with the run); --init from a sharded run;
    a sharded checkpoint is not resumed under DDP; train.parallel is validated."""
    from vlp.train.trainer import Trainer

    cfg = load_run_config("clip", tiny_config, ["train.parallel=fsdp", "train.steps=2", "train.ckpt_every=2"])
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert not torch.distributed.is_initialized()
    assert (ckpt.latest_checkpoint(tmp_path / "run") / ckpt.SHARDED / ".metadata").is_file()
    init = Trainer(load_run_config("clip", tiny_config, ["train.steps=1"]), tmp_path / "ft", init=tmp_path / "run")
    init.close()
    record = [r for r in read_metrics(tmp_path / "ft" / "metrics.jsonl") if r.get("event") == "init"][0]
    assert not record["missing"] and not record["unexpected"]
    ddp = load_run_config("clip", tiny_config, ["train.steps=3"])
    with pytest.raises(RunError, match="train.parallel=fsdp"):
        Trainer(ddp, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ConfigError, match="train.parallel"):
        load_run_config("clip", tiny_config, ["train.parallel=zero3"])


def test_sharded_checkpoint_cannot_run_code(tmp_path, tiny_config):
    """A `.metadata` naming any global outside DCP's records is refused before it is built, and
    so is a checkpoint with non-tensor entries (DCP unpickles those fully)."""
    import torch.distributed.checkpoint as dcp

    from vlp.train.fsdp import consolidated_weights

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="posix.system|os.system"):
        consolidated_weights(bad)
    assert not marker.exists()
    dcp.save({"model": {"w": torch.ones(2)}, "note": "text"}, checkpoint_id=str(tmp_path / "bytes"), no_dist=True)
    with pytest.raises(ValueError, match="not a tensor"):
        consolidated_weights(tmp_path / "bytes")


def _drive(spec_path: str) -> None:
    """torchrun driver: train each run of the spec; the processes of the run named `killed`
    SIGKILL themselves once step 4 is logged (its newest checkpoint: step 3)."""
    from vlp.models.registry import config_fields
    from vlp.train.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    for name, overrides in spec["runs"].items():
        cfg = load_run_config(spec["recipe"], spec["config"], overrides, model_fields=config_fields)
        out = Path(spec["out"]) / name
        trainer = Trainer(cfg, out, progress=False)
        if name == "killed":
            log = trainer._log

            def log_then_die(record, trainer=trainer, log=log):
                log(record)
                if "loss" in record and trainer.step == 4:
                    torch.distributed.barrier()  # both ranks past step 4, then kill -9
                    os.kill(os.getpid(), signal.SIGKILL)

            trainer._log = log_then_die
        trainer.fit()
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            (out / "done").write_text("")


if __name__ == "__main__":
    _drive(sys.argv[1])
