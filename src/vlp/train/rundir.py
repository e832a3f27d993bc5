"""Guards around a run directory: one writer at a time, no run overwritten by accident, resume
from the run's own config, and metrics that match the checkpoint a run resumes from.

A run directory holds `config.yaml`, `tokenizer.json`, `metrics.jsonl` and `checkpoints/`
(see `vlp.train.trainer`), plus `.lock` while a process trains into it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from vlp.config import RunConfig, apply_overrides, from_dict, load_run_config, load_yaml, to_dict
from vlp.train.checkpoint import write_text_atomic

# What a training run writes; `--overwrite` removes exactly these.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "tokenizer.json", "eval.json", "report.html")
# Settings that change how a run is executed or logged but not what it computes: a resume may change them.
RUNTIME_KEYS = {
    "data.workers",
    "data.strict",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.threads",
    "train.device",
    "train.dist_timeout",
    "train.grad_checkpointing",  # the same gradients, recomputed
    "train.log_to",
}


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; the message says what to do instead."""


class RunLock:
    """An exclusive lock on `run_dir/.lock`, which holds the owner's PID. The operating system
    drops the lock when its process ends, however it ends (kill -9 included)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunError(
                f"{run_dir} is in use by another vlp process (PID {holder}); wait for it "
                "to finish or train into another --out"
            ) from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def holds_run(run_dir: Path) -> bool:
    """Whether a training run has already written into `run_dir`."""
    return any((Path(run_dir) / name).exists() for name in ("checkpoints", "metrics.jsonl", "config.yaml"))


def start_fresh(run_dir: Path, overwrite: bool) -> None:
    """Refuse a directory that holds a run, or with `overwrite` remove that run's files. Each is
    first moved whole into `.tmp_overwritten/` (a rename), so a kill never leaves half a
    `checkpoints/` whose `latest` names a deleted step."""
    trash = Path(run_dir) / ".tmp_overwritten"
    shutil.rmtree(trash, ignore_errors=True)  # left by a kill during an earlier overwrite
    if not holds_run(run_dir):
        return
    if not overwrite:
        raise RunError(
            f"{run_dir} already holds a run: continue it with --resume, start it over with "
            "--overwrite, or choose a fresh --out"
        )
    trash.mkdir()
    for name in RUN_FILES:
        if (Path(run_dir) / name).exists():
            os.replace(Path(run_dir) / name, trash / name)
    shutil.rmtree(trash)


def parse_record(line: str) -> dict[str, Any] | None:
    """One line of a metrics.jsonl as a record, or None: a line cut by a kill mid-write (or any
    other line that is not a JSON object)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line that does not parse is left out."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [record for record in map(parse_record, lines) if record is not None]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records logged after checkpoint `step` (the resumed run logs those steps again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def resume_config(
    run_dir: Path,
    recipe: str,
    config: Path | None = None,
    overrides: list[str] | None = None,
    allow_changes: bool = False,
) -> RunConfig:
    """The config to resume `run_dir` with: its own `config.yaml` (or `config`) plus `overrides`.

    A change to anything but `RUNTIME_KEYS` would make the resumed run differ from an unbroken
    one, so it is refused, naming each changed key, unless `allow_changes`.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        raise RunError(f"--resume: {run_dir} has no config.yaml (not a vlp run)")
    saved = from_dict(RunConfig, load_yaml(saved_path))
    if saved.recipe != recipe:
        raise RunError(f"--resume: {run_dir} is a {saved.recipe!r} run, not {recipe!r}")
    if config is not None:
        cfg = load_run_config(recipe, config, overrides)
    else:
        cfg = from_dict(RunConfig, apply_overrides(to_dict(saved), list(overrides or [])))
    changes = {
        key: pair
        for key, pair in _differences(to_dict(saved), to_dict(cfg)).items()
        if key not in RUNTIME_KEYS and not _same_path(key, *pair)
    }
    if changes and not allow_changes:
        listed = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        raise RunError(
            f"--resume: {listed} differ from {saved_path}, which breaks exact resumption; drop "
            "the change, or pass --allow-changes to resume with it anyway"
        )
    return cfg


def _differences(old: Any, new: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf value that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for name in {**old, **new}:
            found.update(_differences(old.get(name), new.get(name), f"{key}.{name}" if key else name))
        return found
    return {} if old == new else {key: (old, new)}


def _same_path(key: str, old: Any, new: Any) -> bool:
    """The data path written two ways (`data/x` and `./data/x/`) is no change."""
    return (
        key == "data.path"
        and isinstance(old, str)
        and isinstance(new, str)
        and Path(old).resolve() == Path(new).resolve()
    )
