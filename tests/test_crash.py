"""The crash suite of the reliability issue: `kill -9` at random moments, some of them inside a
checkpoint write, 10 times per recipe (CLIP and BLIP, 2 DataLoader workers). After each kill the
run is resumed (or, with no checkpoint yet, started over with --overwrite) until it completes; it must then equal
an unbroken run bit for bit (every checkpoint: weights and training state; every logged loss)
and hold no temporary file.

Slow (a few minutes on 2 cores): `pytest -m slow tests/test_crash.py` (`-s` shows where the kills
landed).
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import median

import pytest
import torch
import yaml
from conftest import TINY_CONFIG
from safetensors.torch import load_file

import vlp
from vlp.train.rundir import read_metrics

STEPS, CKPT_EVERY, KILLS = 30, 2, 10
POLL = 0.002  # s; a checkpoint write of these tiny models takes 10-100 ms, so polling catches it
ATTEMPT_TIMEOUT = 180  # s for one training process, start-up included
TIMING_KEYS = {"steps_per_s", "samples_per_s"}  # the only logged values allowed to differ
RUN = [
    "data.workers=2",
    f"train.steps={STEPS}",
    "train.log_every=1",
    f"train.ckpt_every={CKPT_EVERY}",
    "train.keep_checkpoints=0",
]  # 0: keep every checkpoint, so each one can be compared
BLIP_TINIER = [
    "data.batch_size=16",
    "model.vision.image_size=32",
    "model.vision.width=32",
    "model.vision.layers=2",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=2",
    "model.text.heads=2",
    "model.contrastive.embed_dim=32",
    "model.contrastive.queue_size=64",
    "model.contrastive.alpha_ramp_steps=8",
    "train.warmup=2",
]  # ~60 ms a step; the queue wraps
BEFORE_FIRST, IN_WRITE, ELSEWHERE = "before the first checkpoint", "during a checkpoint write", "elsewhere"


def recipe_command(recipe: str, tmp_path: Path, shapes_dir: Path):
    """A function (out, resume) -> the `vlp train` command line of the recipe's tiny run."""
    if recipe == "clip":
        config = tmp_path / "clip.yaml"
        config.write_text(yaml.safe_dump({**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "path": str(shapes_dir)}}))
        overrides = RUN
    else:
        config = Path(vlp.__file__).parent / "configs" / "blip" / "tiny.yaml"
        overrides = [f"data.path={shapes_dir}", *BLIP_TINIER, *RUN]

    def command(out: Path, resume: bool) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vlp.cli",
            "train",
            recipe,
            "--config",
            str(config),
            "--out",
            str(out),
            "--no-progress",
            "--resume" if resume else "--overwrite",
            *overrides,
        ]

    return command


# --- watching and killing a training process ------------------------------------------------


def identities(directory: Path) -> dict[str, tuple[int, int]]:
    """Each entry's (inode, ctime): it changes when a name is written anew, so a temporary
    directory left by an earlier kill is told apart from one being written now."""
    found = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.name] = (stat.st_ino, stat.st_ctime_ns)
    except FileNotFoundError:
        pass
    return found


def is_temporary(name: str) -> bool:
    return name.startswith(".tmp") or name.endswith(".tmp")  # .tmp_step_* dirs, .latest.tmp files


def latest_step(run: Path) -> int | None:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else None


def is_start(record: dict) -> bool:
    return record.get("event") == "start"


class Trigger:
    """When to kill one training process: `startup` at a random moment of its start-up (before
    its first step), `step` at a random moment of a random coming step, `write` inside the write of
    a coming checkpoint (just as its temporary directory appears, or a few ms later), `watch`
    never (it only times the process). The targets stay in the steps the process will reach."""

    def __init__(self, kind: str, rng: random.Random, run: Path, timing: dict, first: bool, last: bool):
        self.kind, self.run, self.spawned, self.at = kind, run, time.monotonic(), None
        self.starts = sum(map(is_start, read_metrics(run / "metrics.jsonl")))  # earlier processes'
        self.first_loss, self.stamp, self.mine = None, None, []  # `mine`: steps this process logged
        done = latest_step(run) or 0
        ahead = [
            c
            for c in range(done + CKPT_EVERY, done + 3 * CKPT_EVERY + 1, CKPT_EVERY)
            if c < STEPS or last and c == STEPS
        ]
        if kind == "write" and not ahead:  # only the final checkpoint is left: a kill after it would
            self.kind = kind = "step"  # complete the run, so kill inside a step instead
        if kind == "startup":  # (the first process, which has no checkpoint yet, within 60%)
            self.at = self.spawned + rng.uniform(0.1, 0.6 if first else 1.0) * timing["startup"]
        elif kind == "step":  # in the step after `target` (which stays short of the end)
            self.target = min(rng.randint(done + 1, done + 3 * CKPT_EVERY + 1), max(STEPS - 3, done + 1))
            self.extra = rng.uniform(0, timing["step"])
        elif kind == "write":
            self.target = rng.choice(ahead)
            self.extra = rng.choice([0.0, rng.uniform(0, 0.005)])
            self.names = [f".tmp_step_{self.target:07d}", f"step_{self.target:07d}"]  # the latter: a missed write
            self.before = identities(run / "checkpoints")

    def due(self) -> bool:
        if self.kind == "startup":  # at the latest when it logs its first step
            return time.monotonic() >= self.at or self._step_reached(None)
        if self.at is None:
            reached = (
                self._write_started()
                if self.kind == "write"
                else self._step_reached(self.target if self.kind == "step" else None)
            )
            if not reached or self.kind == "watch":
                return False
            self.at = time.monotonic() + self.extra
        # A step kill lands before the next step is logged, however much faster than the
        # reference's steps (which timed `extra`) this process runs.
        return time.monotonic() >= self.at or self.kind == "step" and self._step_reached(self.target + 1)

    def _write_started(self) -> bool:
        now = identities(self.run / "checkpoints")
        return any(name in now and now[name] != self.before.get(name) for name in self.names)

    def _step_reached(self, step: int | None) -> bool:
        """Whether this process has logged `step` (None: any step)."""
        path = self.run / "metrics.jsonl"
        try:
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self.stamp:  # parse the records of this process only when the file changed
            self.stamp, self.mine, starts = stamp, [], 0
            for record in read_metrics(path):
                starts += is_start(record)
                if starts > self.starts and "loss" in record:
                    self.mine.append(record.get("step", 0))
            if self.mine and self.first_loss is None:
                self.first_loss = time.monotonic() - self.spawned
        return bool(self.mine) and (step is None or max(self.mine) >= step)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: the trainer and its DataLoader workers."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    members = []
    for entry in os.scandir("/proc"):
        try:
            stat = Path(entry.path, "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def run_process(command: list[str], log: Path, trigger: Trigger) -> int:
    """Run one training process in its own session until it exits or `trigger` fires, then
    SIGKILL its whole process group (DataLoader workers included) and wait until all of it is
    gone. Returns the exit status: -9 when killed."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}  # {trigger.kind}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ATTEMPT_TIMEOUT
        while proc.poll() is None:
            if trigger.due():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, f"{command} ran over {ATTEMPT_TIMEOUT} s:\n{tail(log)}"
            time.sleep(POLL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 30
        while group_members(proc.pid):
            assert time.monotonic() < deadline, f"processes of group {proc.pid} outlived SIGKILL"
            time.sleep(0.01)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --- the runs -----------------------------------------------------------------------------------


def reference_run(command, run: Path, log: Path) -> dict:
    """The unbroken run; returns its timing (start-up to the first logged step, seconds per step)
    to place the victim's kills."""
    watch = Trigger("watch", random.Random(0), run, {}, first=True, last=False)
    status = run_process(command(run, resume=False), log, watch)
    assert status == 0, tail(log)
    per_step = [
        1 / r["steps_per_s"]
        for r in read_metrics(run / "metrics.jsonl")
        if r.get("step", 0) >= 2 and r.get("steps_per_s")
    ]
    return {"startup": watch.first_loss, "step": median(per_step)}


def kill_plan(rng: random.Random) -> list[str]:
    """KILLS kinds: the first at start-up (the run has no checkpoint yet), then a shuffled mix."""
    rest = ["write"] * 3 + ["step"] * 3 + ["startup"] + [rng.choice(["startup", "step", "write"]) for _ in range(2)]
    rng.shuffle(rest)
    return ["startup", *rest]


def where_it_landed(run: Path, before: dict[str, tuple[int, int]]) -> str:
    """A temporary entry this process created and did not rename away: killed mid-write."""
    after = identities(run / "checkpoints")
    if any(is_temporary(name) and before.get(name) != ident for name, ident in after.items()):
        return IN_WRITE
    return ELSEWHERE if latest_step(run) is not None else BEFORE_FIRST


def crash_until_done(command, run: Path, log: Path, timing: dict, rng: random.Random) -> Counter:
    """Kill the run KILLS times, resuming it (or with no checkpoint, starting it over) after
    each kill, then let it finish. Returns where the kills landed."""
    landed: Counter = Counter()
    for number, kind in enumerate(kill_plan(rng)):
        last = number == KILLS - 1
        kind = "write" if last and not landed[IN_WRITE] else kind  # at least one kill mid-write
        start = latest_step(run)
        resume = start is not None
        before = identities(run / "checkpoints")
        trigger = Trigger(kind, rng, run, timing, first=number == 0, last=last)
        status = run_process(command(run, resume), log, trigger)
        assert status == -signal.SIGKILL, (
            f"attempt {number} ({kind}, resume={resume}) ended with status {status} before its kill:\n{tail(log)}"
        )
        where = where_it_landed(run, before)
        landed[where] += 1
        target = (
            f" {'after' if trigger.kind == 'step' else 'of'} step {trigger.target}"
            if hasattr(trigger, "target")
            else ""
        )
        print(
            f"kill {number + 1}, {trigger.kind}{target}, {'resumed at step ' if resume else 'fresh'}"
            f"{start if resume else ''}: {where}"
        )
    status = run_process(
        command(run, latest_step(run) is not None), log, Trigger("watch", rng, run, timing, False, False)
    )
    assert status == 0, tail(log)
    return landed


# --- comparing two runs ---------------------------------------------------------------------------


def assert_same(a, b, where: str) -> None:
    """Nested dicts/lists/tuples of tensors and plain values equal bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{where}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: tensors differ ({(a != b).sum().item()} of {a.numel()} elements)"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else type(b)}"
        )
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__}[{len(a)}] vs {b!r:.80}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def load_any(path: Path):
    """A checkpoint file's content: tensors (safetensors; a torch.save'd state.pt, tensors and
    plain data only), JSON data, or else the bytes."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    return path.read_bytes()


def assert_same_checkpoints(reference: Path, victim: Path) -> None:
    """Every checkpoint of the victim (weights and training state) equals the reference's."""
    ref_root, victim_root = reference / "checkpoints", victim / "checkpoints"
    assert (victim_root / "latest").read_text() == (ref_root / "latest").read_text() == f"step_{STEPS:07d}"
    steps = sorted(p.name for p in ref_root.glob("step_*"))
    assert sorted(p.name for p in victim_root.glob("step_*")) == steps
    for step in steps:
        names = sorted(p.name for p in (ref_root / step).iterdir())
        assert sorted(p.name for p in (victim_root / step).iterdir()) == names, step
        for name in names:
            assert_same(load_any(victim_root / step / name), load_any(ref_root / step / name), f"{step}/{name}")


def logged_steps(run: Path) -> list[dict]:
    """The records logged for the steps, less their timings (a resume drops what was logged
    after its checkpoint, so each step appears once)."""
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run / "metrics.jsonl") if "loss" in r
    ]


def temporaries(run: Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(root, name), run)
        for root, dirs, files in os.walk(run)
        for name in dirs + files
        if is_temporary(name)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["clip", "blip"])
def test_kill_9_then_resume_equals_an_unbroken_run(recipe, tmp_path, shapes_dir):
    began = time.monotonic()
    command, log = recipe_command(recipe, tmp_path, shapes_dir), tmp_path / "train.log"
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    timing = reference_run(command, reference, log)
    landed = crash_until_done(command, victim, log, timing, random.Random(f"crash-{recipe}"))
    print(
        f"\n{recipe}: {KILLS} kills: {dict(landed)}; reference start-up {timing['startup']:.1f} s, "
        f"{1000 * timing['step']:.0f} ms a step; {time.monotonic() - began:.0f} s in all"
    )
    assert_same_checkpoints(reference, victim)
    ref_logged, victim_logged = logged_steps(reference), logged_steps(victim)
    assert [r["step"] for r in ref_logged] == list(range(1, STEPS + 1))
    assert victim_logged == ref_logged
    assert not temporaries(victim), temporaries(victim)
    assert landed[BEFORE_FIRST] >= 1 and landed[IN_WRITE] >= 1, dict(landed)
