"""What docs/reliability.md promises about run directories: nothing in a checkpoint is unpickled,
no run is overwritten or written by two processes, a resume uses the run's own config, and a
user's mistake ends with one line, not a traceback."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlp.cli import app
from vlp.config import load_run_config
from vlp.train import checkpoint as ckpt
from vlp.train.rundir import RunError, RunLock
from vlp.train.trainer import Trainer, train_run


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train(cfg, run_dir: Path, stop_at: int | None = None, **kwargs) -> None:
    Trainer(cfg, run_dir, progress=False, **kwargs).fit(stop_at=stop_at)


def losses_by_step(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def vlp_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlp.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


class Payload:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_state_is_json_and_safetensors_and_resumes_exactly(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_at=3)
    checkpoint = ckpt.latest_checkpoint(tmp_path / "resumed")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 3
    train(cfg, tmp_path / "resumed", resume=True)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_pickled_state_is_refused_without_running_it(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config)
    train(cfg, tmp_path / "run", stop_at=3)
    checkpoint = ckpt.latest_checkpoint(tmp_path / "run")
    for name in ("state.json", "state.safetensors"):
        (checkpoint / name).unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 3, "payload": Payload(marker)}, checkpoint / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    assert not marker.exists()


def test_state_pt_of_earlier_versions_still_resumes(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "old", stop_at=3)
    checkpoint = ckpt.latest_checkpoint(tmp_path / "old")
    torch.save(ckpt.load_state(checkpoint), checkpoint / "state.pt")  # what vlp 0.1 wrote
    for name in ("state.json", "state.safetensors"):
        (checkpoint / name).unlink()
    train(cfg, tmp_path / "old", resume=True)
    assert_same_weights(tmp_path / "straight", tmp_path / "old")


def test_training_into_a_run_is_refused_unless_overwrite(tmp_path, tiny_config):
    long_cfg, short_cfg = (load_run_config("clip", tiny_config, [f"train.steps={n}"]) for n in (6, 3))
    train(long_cfg, tmp_path / "run")
    before = weights(tmp_path / "run")
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        Trainer(short_cfg, tmp_path / "run", progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "run").items())

    train(short_cfg, tmp_path / "run", overwrite=True)
    train(short_cfg, tmp_path / "fresh")
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_0000003"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000003"]
    assert_same_weights(tmp_path / "run", tmp_path / "fresh")
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "fresh")


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, tiny_config):
    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    try:
        result = vlp_command(
            "train", "clip", "--config", str(tiny_config), "--out", str(tmp_path / "run"), "--no-progress"
        )
    finally:
        lock.release()
    assert result.returncode == 1
    assert f"in use by another vlp process (PID {os.getpid()})" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_saving_a_model_into_a_run_is_refused(tmp_path, tiny_config):
    import vlp

    train(load_run_config("clip", tiny_config, ["train.steps=3"]), tmp_path / "run")
    with pytest.raises(RunError, match="already holds a vlp run"):
        vlp.save(vlp.load(tmp_path / "run"), tmp_path / "run")
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_0000003"


def test_lock_is_released_when_training_ends(tmp_path, tiny_config):
    cfg = load_run_config("clip", tiny_config, ["train.steps=2"])
    train(cfg, tmp_path / "run")
    RunLock(tmp_path / "run").release()  # free again
    with pytest.raises(RunError, match="already holds a run"):  # the refusal releases it too
        Trainer(cfg, tmp_path / "run", progress=False)
    RunLock(tmp_path / "run").release()


def test_resume_uses_the_runs_own_config(tmp_path, tiny_config):
    """The README's `vlp train clip --out RUN --resume` on a run trained with overrides."""
    overrides = ["model.embed_dim=16", "train.seed=3"]
    cfg = load_run_config("clip", tiny_config, overrides)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "run", stop_at=3)
    result = CliRunner().invoke(app, ["train", "clip", "--out", str(tmp_path / "run"), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "straight", tmp_path / "run")


@pytest.mark.parametrize(
    "change, named",
    [
        (["data.batch_size=8"], ["data.batch_size 16 -> 8"]),
        (["train.seed=1"], ["train.seed 0 -> 1"]),
        (["train.lr=0.01", "model.embed_dim=16"], ["train.lr 0.001 -> 0.01", "model.embed_dim 32 -> 16"]),
    ],
)
def test_resume_refuses_changes_that_break_exactness(tmp_path, tiny_config, change, named):
    train(load_run_config("clip", tiny_config), tmp_path / "run", stop_at=3)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(RunError, match="--allow-changes") as refused:
        train_run("clip", tmp_path / "run", overrides=change, resume=True, progress=False)
    assert all(change in str(refused.value) for change in named)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_resume_accepts_runtime_settings_and_allowed_changes(tmp_path, tiny_config):
    train(load_run_config("clip", tiny_config), tmp_path / "run", stop_at=3)
    train_run(
        "clip",
        tmp_path / "run",
        overrides=["data.workers=1", "train.log_every=2", "train.steps=4"],
        resume=True,
        progress=False,
        allow_changes=True,
    )
    assert "steps: 4" in (tmp_path / "run" / "config.yaml").read_text()
    train_run("clip", tmp_path / "run", overrides=["train.steps=4", "train.ckpt_every=1"], resume=True, progress=False)
    with pytest.raises(RunError, match="is a 'clip' run, not 'blip'"):
        train_run("blip", tmp_path / "run", resume=True, progress=False)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, tiny_config):
    """A kill between a log and the next checkpoint: the resumed run logs those steps again,
    once, with the same values as an unbroken run."""
    cfg = load_run_config("clip", tiny_config)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "run", stop_at=5)  # checkpoints at 3 and 5
    root = tmp_path / "run" / "checkpoints"
    ckpt.write_text_atomic(root / "latest", "step_0000003")  # as if killed before step 5's checkpoint
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # and in the middle of a line
    train(cfg, tmp_path / "run", resume=True)
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "straight")


def test_full_disk_leaves_the_last_checkpoint_and_no_temporary_files(tmp_path, tiny_config, monkeypatch):
    cfg = load_run_config("clip", tiny_config)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit(stop_at=3)

    def disk_full(model, path):
        path.write_bytes(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_weights", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="step 6 .*No space left on device.*previous checkpoint is intact"):
        train(cfg, tmp_path / "run", resume=True)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_0000003"
    assert not list((tmp_path / "run").rglob(".tmp*"))


def test_user_mistakes_end_with_one_line(tmp_path, tiny_config, shapes_dir):
    (tmp_path / "runs").mkdir()
    for args, message in [
        (
            ["train", "clip", "--config", str(tiny_config), "--out", "runs/a", "train.steps=0"],
            "error: train.steps must be greater than 0, got 0",
        ),
        (
            ["train", "clip", "--config", str(tiny_config), "--out", "runs/a", "data.crop_scale=[0.9,0.2]"],
            "error: data.crop_scale must be [low, high] with 0 < low <= high <= 1",
        ),
        (["eval", "runs/nope"], "error: runs/nope: no such directory"),
        (
            ["train", "blip2_stage2", "--out", "runs/b", "--data", str(shapes_dir), "--lm", "runs/no-lm"],
            "error: model.lm: runs/no-lm is not a directory",
        ),
    ]:
        result = vlp_command(*args, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(message), result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_frozen_ddp_peer_ends_the_job_with_a_message(tmp_path, tiny_config):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    args = [
        sys.executable,
        "-m",
        "vlp.cli",
        "train",
        "clip",
        "--config",
        str(tiny_config),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "train.steps=100000",
        "train.dist_timeout=3",
    ]
    ranks = [
        subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and '"loss"' in metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(ranks[1].pid, signal.SIGSTOP)  # frozen, not dead: its sockets stay open
        ranks[0].wait(timeout=60)
        stderr = ranks[0].stderr.read()
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 1
    assert "error: rank 0: another rank did not answer for 3 s (train.dist_timeout)" in stderr
    assert "Traceback" not in stderr
