"""The training loop. It knows nothing about any paper: a recipe's `forward(batch)` returns named
losses, which are summed with `train.loss_weights` (default 1 each) and optimised; a recipe with
an `after_optimizer_step()` method (momentum encoders) has it called after every update.

Run directory: `config.yaml`, `tokenizer.json`, `metrics.jsonl` (one JSON object per log step and
per data event), `checkpoints/` (see `vlp.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlp.config import RunConfig, to_dict
from vlp.data.formats import format_skips, open_dataset
from vlp.data.loader import Collator, TrainSet, train_loader
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import train_transform
from vlp.models import create_model
from vlp.models.registry import recipe_classes, text_config
from vlp.train import checkpoint as ckpt
from vlp.train import distributed as dist
from vlp.train.optim import build_optimizer, build_scheduler, freeze
from vlp.train.precision import resolve_device, resolve_precision

console = Console(stderr=True)


def prepare_tokenizer(run_dir: Path, data_path: Path, dataset) -> Tokenizer:
    """The run's tokenizer: the run's own, else the data set's, else one trained on its captions."""
    for candidate in (run_dir / "tokenizer.json", data_path / "tokenizer.json"):
        if candidate.is_file():
            tokenizer = Tokenizer.load(candidate)
            break
    else:
        console.print(f"training a tokenizer on the {len(dataset)} captions lists of {data_path}")
        tokenizer = Tokenizer.train(c for i in range(len(dataset)) for c in dataset.captions(i))
    if dist.is_main():
        tokenizer.save(run_dir / "tokenizer.json")
    return tokenizer


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> nn.Module:
    """The recipe's model with its text vocabulary sized to the tokenizer (and, for recipes
    that use special tokens such as [MASK] or [DEC], their ids in this vocabulary)."""
    model_cls, config_cls = recipe_classes(cfg.recipe)
    model_cfg, section = dict(cfg.model), getattr(model_cls, "text_section", "text")
    model_cfg[section] = {**model_cfg.get(section, {}), "vocab_size": tokenizer.vocab_size}
    if "tokens" in {f.name for f in fields(config_cls)}:
        model_cfg["tokens"] = {**tokenizer.special_ids(), **model_cfg.get("tokens", {})}
    return create_model(cfg.recipe, model_cfg)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, init: Path | None = None,
                 progress: bool = True):
        dist.init_from_env()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), progress
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data_path = Path(cfg.data.path)
        self.dataset = open_dataset(data_path, split=cfg.data.train_split, format=cfg.data.format,
                                    strict=cfg.data.strict)
        if self.dataset.skipped and dist.is_main():
            console.print(f"[yellow]{format_skips(self.dataset.skipped)}")
        if init is not None and not resume and dist.is_main():
            shutil.copyfile(ckpt.run_of(init) / "tokenizer.json", self.run_dir / "tokenizer.json")
        dist.barrier()
        self.tokenizer = prepare_tokenizer(self.run_dir, data_path, self.dataset)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, self.tokenizer).to(self.device)
        if init is not None and not resume:
            self._initialise_from(Path(init))
        if cfg.train.freeze:
            self._log({"event": "freeze", "patterns": cfg.train.freeze,
                       "parameters": freeze(self.model, cfg.train.freeze)})
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.step = 0
        if resume:
            self._restore()
        if dist.is_main():
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self._log({"event": "start", "step": self.step, "device": str(self.device), "precision": self.precision})
        unused = getattr(self.model, "has_unused_parameters", False)
        self.ddp = (DistributedDataParallel(self.model, find_unused_parameters=unused)
                    if dist.is_distributed() else None)
        self.skipped_this_epoch: list = []
        self.epoch = self.samples_seen() // len(self.dataset)

    def samples_seen(self) -> int:
        return self.step * self.global_batch_per_step()

    def global_batch_per_step(self) -> int:
        return self.cfg.data.batch_size * dist.world_size() * self.cfg.train.accum

    def _initialise_from(self, init: Path) -> None:
        """Fine-tuning: the pretrained weights wherever names and shapes match; report the rest."""
        weights = ckpt.weights_of(init)
        report = ckpt.load_matching_weights(self.model, weights)
        if dist.is_main():
            console.print(f"initialised from {weights}")
            for what, names in report.items():
                if names:
                    console.print(f"[yellow]{len(names)} weights {what} (not taken from the run): "
                                  f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
            self._log({"event": "init", "from": str(weights), **report})

    def _restore(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        ckpt.load_weights(self.model, path / "model.safetensors")
        state = ckpt.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        if dist.is_main():
            console.print(f"resumed from {path} at step {self.step}")

    def _save(self) -> None:
        if dist.is_main():
            state = {"step": self.step, "samples_seen": self.samples_seen(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": ckpt.rng_state(), "config": to_dict(self.cfg)}
            ckpt.save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.train.keep_checkpoints)
        dist.barrier()

    def _log(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _report_skips(self, epoch: int) -> None:
        if self.skipped_this_epoch and dist.is_main():
            console.print(f"[yellow]epoch {epoch}: {format_skips(self.skipped_this_epoch)}")
            self._log({"event": "skipped", "epoch": epoch, "step": self.step,
                       "count": len(self.skipped_this_epoch),
                       "samples": [f"{s.source}: {s.reason}" for s in self.skipped_this_epoch[:100]]})
        self.skipped_this_epoch = []

    def _next_batch(self, batches) -> dict[str, Any]:
        batch = next(batches)
        if batch["epoch"] > self.epoch:
            self._report_skips(self.epoch)
            self.epoch = batch["epoch"]
        self.skipped_this_epoch += batch["skipped"]
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16")
        with autocast:
            losses = (self.ddp or self.model)(batch)
        weights = self.cfg.train.loss_weights
        total = sum(weights.get(name, 1.0) * value for name, value in losses.items())
        return total, losses

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns the logged values."""
        accum = self.cfg.train.accum
        totals: dict[str, float] = {}
        for micro in range(accum):
            sync = self.ddp is None or micro == accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                total, losses = self._losses(self._next_batch(batches))
                (total / accum).backward()
            for name, value in {"loss": total, **losses}.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accum
        if self.cfg.train.grad_clip > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                        self.cfg.train.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_optimizer_step"):  # e.g. momentum (EMA) encoders
            self.model.after_optimizer_step()
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return totals

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TextColumn("loss {task.fields[loss]}"),
                        TimeRemainingColumn(), console=console,
                        disable=not (self.show_progress and dist.is_main()))

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until `train.steps` (or `stop_at`, as if killed there), checkpointing every
        `ckpt_every` steps and at the end."""
        cfg = self.cfg.train
        last = min(cfg.steps, stop_at or cfg.steps)
        self.model.train()
        vision = getattr(self.model.cfg, "vision", None)  # text-only recipes: no images decoded
        transform = train_transform(vision.image_size, scale=self.cfg.data.crop_scale) if vision else None
        collator = Collator(self.tokenizer, text_config(self.model).context_length, self.model.tokenizer_style,
                            self.cfg.data.prompt)
        loader = train_loader(TrainSet(self.dataset, transform, cfg.seed, self.cfg.data.text), collator,
                              self.cfg.data.batch_size * dist.world_size(), cfg.seed, self.samples_seen(),
                              dist.rank(), dist.world_size(), self.cfg.data.workers)
        batches = iter(loader)
        values: dict[str, float] = {}
        with self._progress() as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, rate="", loss="")
            window_start, window_steps = time.perf_counter(), 0
            while self.step < last:
                values = self.train_step(batches)
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    steps_per_s = window_steps / elapsed
                    values.update(step=self.step, epoch=self.epoch, steps_per_s=steps_per_s,
                                  samples_per_s=steps_per_s * self.global_batch_per_step())
                    self._log(values)
                    bar.update(task, rate=f"{steps_per_s:.2f} it/s {values['samples_per_s']:.0f} samples/s",
                               loss=f"{values['loss']:.4f}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(task, completed=self.step)
                if self.step % cfg.ckpt_every == 0 or self.step == last:
                    self._save()
        self._report_skips(self.epoch)
        return values


def train_run(recipe: str, out: Path, config: Path | None = None, overrides: list[str] | None = None,
              init: Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, float]:
    """What `vlp train` does: the run config (with `init`, the pretrained run's architecture,
    see `load_run_config`), then training; returns the last logged values."""
    from vlp.config import load_run_config, load_yaml

    pretrained = load_yaml(ckpt.run_of(init) / "config.yaml") if init is not None else None
    cfg = load_run_config(recipe, config, list(overrides or []), pretrained=pretrained)
    return Trainer(cfg, out, resume=resume, init=init, progress=progress).fit()
