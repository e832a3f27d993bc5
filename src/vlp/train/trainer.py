"""The training loop. It knows nothing about any paper: a recipe's `forward(batch)` returns named
losses, which are summed with `train.loss_weights` (default 1 each) and optimised; a recipe with
an `after_optimizer_step()` method (momentum encoders) has it called after every update.

Run directory: `config.yaml`, `tokenizer.json`, `metrics.jsonl` (one JSON object per log step and
per data event, each with its "step"), `checkpoints/` (see `vlp.train.checkpoint`), and `.lock`
while training (see `vlp.train.rundir`, which also keeps a run from being overwritten by accident
and a resumed run on its own config). Skipped samples are logged per epoch, from every rank, at
each epoch's end and before each checkpoint, so a resumed run logs none twice and loses none.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch.nn.parallel import DistributedDataParallel

from vlp import distributed as dist
from vlp.config import RunConfig, to_dict
from vlp.data.formats import format_skips, open_dataset
from vlp.data.loader import Collator, TrainSet, train_loader
from vlp.data.sample import DataError, Skipped
from vlp.data.streaming import open_stream, streaming_loader
from vlp.data.tokenizer import Tokenizer
from vlp.data.transforms import train_transform
from vlp.models.registry import build_model, config_fields
from vlp.nn.transformer import set_grad_checkpointing
from vlp.train import checkpoint as ckpt
from vlp.train import fsdp, rundir
from vlp.train.board import add_scalars, open_board
from vlp.train.optim import build_optimizer, build_scheduler, freeze
from vlp.train.precision import autocast, resolve_device, resolve_precision

console = Console(stderr=True)


def prepare_tokenizer(run_dir: Path, data_path: Path, dataset) -> Tokenizer:
    """The run's tokenizer: the run's own, else the data set's, else one trained on its captions."""
    own = run_dir / "tokenizer.json"
    for candidate in (own, data_path / "tokenizer.json"):
        if candidate.is_file():
            tokenizer = Tokenizer.load(candidate)
            break
    else:
        candidate = None
        console.print(f"training a tokenizer on the {len(dataset)} captions lists of {data_path}")
        tokenizer = Tokenizer.train(c for i in range(len(dataset)) for c in dataset.captions(i))
    if dist.is_main() and candidate != own:
        # Written whole under another name, then renamed: another rank may be reading `own`.
        # (A rewrite in place let a resumed rank read it half-written: DataError, exit 1.)
        tmp = run_dir / ".tmp_tokenizer.json"
        tokenizer.save(tmp)
        os.replace(tmp, own)
    return tokenizer


class Trainer:
    """Trains `cfg` into `run_dir`: a fresh run (refused where a run already is, unless
    `overwrite`), a resumed one (`resume`: exactly where its newest checkpoint left off), or a
    fine-tuning run (`init`: weights and tokenizer of a pretrained run). Holds the run's lock
    until `fit` returns."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        resume: bool = False,
        init: Path | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ):
        dist.init_from_env(cfg.train.dist_timeout)
        self.sharded = cfg.train.parallel == "fsdp"  # FSDP2 (vlp.train.fsdp), else DDP
        self.own_group = self.sharded and fsdp.ensure_process_group()  # FSDP alone: a one-rank group
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), progress
        self.board = None  # TensorBoard, opened once the run's step is known
        self.lock = self._claim_run_dir(resume, overwrite)
        try:
            self._set_up(resume, init)
        except BaseException:
            self.close()
            raise

    def _set_up(self, resume: bool, init: Path | None) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        data_path = Path(cfg.data.path)
        if cfg.data.streaming:  # shards read from disk as the stream goes (vlp.data.streaming)
            self.dataset = open_stream(cfg.data, cfg.train.seed)
        else:
            self.dataset = open_dataset(
                data_path,
                split=cfg.data.train_split,
                format=cfg.data.format,
                strict=cfg.data.strict,
                image_root=cfg.data.image_root,
                max_pixels=cfg.data.max_pixels,
            )
        if not len(self.dataset):
            raise DataError(
                f"{data_path}: no usable sample in split {cfg.data.train_split!r}; {format_skips(self.dataset.skipped)}"
            )
        if init is not None and not resume and dist.is_main():
            shutil.copyfile(ckpt.run_of(init) / "tokenizer.json", self.run_dir / "tokenizer.json")
        dist.barrier()
        self.tokenizer = prepare_tokenizer(self.run_dir, data_path, self.dataset)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)  # its state is checkpointed: two runs of one seed write the same files
        self.model = build_model(cfg, self.tokenizer).to(self.device)
        set_grad_checkpointing(self.model, cfg.train.grad_checkpointing)
        self.step, self.position = 0, 0  # optimizer steps; samples drawn from the stream
        if init is not None and not resume:
            self._initialise_from(Path(init))
        if cfg.train.freeze:
            frozen = freeze(self.model, cfg.train.freeze)
            if not resume:
                self._log({"event": "freeze", "patterns": cfg.train.freeze, "parameters": frozen})
        if self.sharded:  # in place, before the optimizer is built on the sharded parameters
            self.replicated = fsdp.shard(self.model, self.device, self.precision)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        if resume:
            self._restore()
        elif self.dataset.skipped:
            self._log({"event": "skipped", "phase": "listing", **_skip_summary(self.dataset.skipped)})
        if self.dataset.skipped and dist.is_main():
            console.print(f"[yellow]listing {data_path}: {format_skips(self.dataset.skipped)}")
        if dist.is_main():
            ckpt.write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.board = open_board(self.run_dir, self.step + 1 if resume else None) if self._logs_to_board() else None
        self._log({"event": "start", "device": str(self.device), "precision": self.precision})
        self.ddp = (
            DistributedDataParallel(self.model, find_unused_parameters=self.model.has_unused_parameters)
            if dist.is_distributed() and not self.sharded
            else None
        )
        self.pending_skips: dict[int, list[Skipped]] = {}
        self.epoch = max(self.position - 1, 0) // len(self.dataset)  # of the last sample drawn

    def _claim_run_dir(self, resume: bool, overwrite: bool) -> rundir.RunLock | None:
        """Lock the run directory (main process), then check it holds what the mode needs."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = rundir.RunLock(self.run_dir) if dist.is_main() else None
        try:
            if resume:
                self.checkpoint = ckpt.latest_checkpoint(self.run_dir)
                if self.checkpoint is None:
                    raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
                self.resume_state = ckpt.load_state(self.checkpoint)  # read once: _restore uses it
                if dist.is_main():
                    rundir.truncate_metrics(self.run_dir, self.resume_state["step"])
            elif dist.is_main():
                rundir.start_fresh(self.run_dir, overwrite)
            dist.barrier()
        except BaseException:
            lock and lock.release()
            raise
        return lock

    def global_batch(self) -> int:
        """Samples one micro-batch draws from the stream, over all ranks."""
        return self.cfg.data.batch_size * dist.world_size()

    def _initialise_from(self, init: Path) -> None:
        """Fine-tuning: the pretrained weights wherever names and shapes match; report the rest."""
        weights = ckpt.weights_of(init)
        report = ckpt.load_matching_weights(self.model, weights)
        if dist.is_main():
            console.print(f"initialised from {weights}")
            for what, names in report.items():
                if names:
                    console.print(
                        f"[yellow]{len(names)} weights {what} (not taken from the run): "
                        f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                    )
            self._log({"event": "init", "from": str(weights), **report})

    def _restore(self) -> None:
        path, state = self.checkpoint, self.resume_state
        if (path / ckpt.SHARDED).is_dir() != self.sharded:
            raise rundir.RunError(
                f"--resume: {path} was written under train.parallel="
                f"{'fsdp' if (path / ckpt.SHARDED).is_dir() else 'ddp'}; resume with that setting "
                "(vlp convert turns a sharded run into an ordinary one, to fine-tune with --init)"
            )
        if self.sharded:
            fsdp.load(path / ckpt.SHARDED, self.model, self.optimizer, state["optimizer"]["param_groups"])
        else:
            ckpt.load_weights(self.model, path / "model.safetensors")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.position = state["step"], state["samples_seen"]
        if dist.is_main():
            console.print(f"resumed from {path} at step {self.step}")

    def _save(self) -> None:
        self._flush_skips()  # logged before the checkpoint: a resume from it neither repeats nor loses them
        sharded = None
        if self.sharded:  # every rank writes its shards, then the main process moves them in
            sharded = self.run_dir / "checkpoints" / f".tmp_sharded_step_{self.step:07d}"
            if dist.is_main():
                shutil.rmtree(sharded, ignore_errors=True)
            dist.barrier()
            param_groups = fsdp.save(sharded, self.model, self.optimizer)
            dist.barrier()
        if dist.is_main():
            state = {
                "step": self.step,
                "samples_seen": self.position,
                "optimizer": {"param_groups": param_groups} if self.sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "config": to_dict(self.cfg),
            }
            model = None if self.sharded else self.model
            ckpt.save_checkpoint(self.run_dir, self.step, model, state, self.cfg.train.keep_checkpoints, sharded)
        dist.barrier()

    def _log(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **record}) + "\n")
        if self.board is not None and "event" not in record:
            add_scalars(self.board, "train", record, self.step, leave_out=("step", "epoch"))

    def _logs_to_board(self) -> bool:
        return dist.is_main() and "tensorboard" in self.cfg.train.log_to

    def _flush_skips(self, before_epoch: int | None = None) -> None:
        """Report the skips of the epochs before `before_epoch` (None: all), from every rank.
        Every rank calls it at the same moments (a collective under DDP)."""
        done = [e for e in self.pending_skips if before_epoch is None or e < before_epoch]
        local = {e: self.pending_skips.pop(e) for e in done}
        by_epoch: dict[int, list[Skipped]] = {}
        for part in dist.gather_objects(local):
            for epoch, skips in part.items():
                by_epoch.setdefault(epoch, []).extend(skips)
        for epoch, skips in sorted(by_epoch.items()):
            if dist.is_main():
                console.print(f"[yellow]epoch {epoch}: {format_skips(skips)}")
            self._log({"event": "skipped", "epoch": epoch, **_skip_summary(skips)})

    def _next_batch(self, batches) -> dict[str, Any]:
        """The next micro-batch in which every rank has a readable sample. A global batch in
        which some rank read none is dropped on every rank, its samples counted as skipped."""
        while True:
            batch = next(batches)
            self.position += self.global_batch()
            for epoch, skipped in batch["skipped"]:
                self.pending_skips.setdefault(epoch, []).append(skipped)
            if (self.position - 1) // len(self.dataset) > self.epoch:
                self.epoch = (self.position - 1) // len(self.dataset)
                self._flush_skips(before_epoch=self.epoch)
            if dist.all_ranks_true(batch["size"] > 0, self.device):
                return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            dropped = Skipped(
                f"stream position {self.position}", "dropped batch: another rank's samples were all unreadable"
            )
            self.pending_skips.setdefault(self.epoch, []).extend([dropped] * batch["size"])

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.cfg.train.loss_weights
        return sum(weights.get(name, 1.0) * value for name, value in losses.items())

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns the logged values."""
        accumulate_pairs = self.cfg.train.accum > 1 and self.model.pair_loss_only
        totals = self._accumulate_pairs(batches) if accumulate_pairs else self._accumulate(batches)
        if self.sharded:
            fsdp.average_replicated(self.replicated)
        if self.cfg.train.grad_clip > 0 and self.sharded:
            totals["grad_norm"] = fsdp.clip_grad_norm(list(self.model.parameters()), self.cfg.train.grad_clip)
        elif self.cfg.train.grad_clip > 0:
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()  # e.g. momentum (EMA) encoders
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return totals

    def _accumulate(self, batches) -> dict[str, float]:
        """Gradients of the mean of `accum` micro-batches' losses, each micro-batch on its own
        (its contrastive negatives are its own); DDP (FSDP) reduces gradients on the last."""
        accum, totals = self.cfg.train.accum, {}
        for micro in range(accum):
            sync = self.ddp is None or micro == accum - 1
            if self.sharded:
                fsdp.set_gradient_sync(self.model, micro == accum - 1)
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with autocast(self.precision, self.device):
                    losses = (self.ddp or self.model)(self._next_batch(batches))
                total = self._weighted(losses)
                (total / accum).backward()
            for name, value in {"loss": total, **losses}.items():
                totals[name] = totals.get(name, 0.0) + value.item() / accum
        return totals

    def _accumulate_pairs(self, batches) -> dict[str, float]:
        """Gradients of the loss of all `accum` micro-batches as one batch, for recipes whose
        loss is a function of the embeddings alone (`pair_loss_only`), with the activation memory
        of one micro-batch (GradCache, Gao et al. 2021, Sec. 3.2): every micro-batch is embedded
        without gradients; the loss over all of them gives the gradients of the embeddings;
        each micro-batch is then embedded again, with the random state of its first pass, and
        back-propagates its slice. The backward runs outside DDP's forward, so the ranks'
        gradients are averaged here. Under FSDP the gradients go through FSDP's own reduction:
        the loss's own parameters (the logit scale) get theirs in the last micro-batch's backward,
        from the loss of the detached embeddings, and only that backward reduces."""
        model, micro, states, images, texts = self.model, [], [], [], []
        with torch.no_grad():
            for _ in range(self.cfg.train.accum):
                micro.append(self._next_batch(batches))
                states.append(_rng_state(self.device))
                with autocast(self.precision, self.device):
                    image_emb, text_emb = model.embed_pair(micro[-1])
                images.append(image_emb.float())
                texts.append(text_emb.float())
        after = _rng_state(self.device)
        image_all, text_all = torch.cat(images).requires_grad_(), torch.cat(texts).requires_grad_()
        with autocast(self.precision, self.device):
            losses = model.pair_losses(image_all, text_all)
        total = self._weighted(losses)
        params = [p for p in model.parameters() if p.requires_grad]
        image_grad, text_grad, *head_grads = torch.autograd.grad(
            total, [image_all, text_all, *([] if self.sharded else params)], allow_unused=True
        )
        for param, grad in zip(params, head_grads):  # the loss's own parameters (the logit scale)
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        sizes = [len(emb) for emb in images]
        for index, (batch, state, image_slice, text_slice) in enumerate(
            zip(micro, states, image_grad.split(sizes), text_grad.split(sizes))
        ):
            last = index == len(micro) - 1
            _set_rng_state(state, self.device)
            if self.sharded:
                fsdp.set_gradient_sync(model, last)
            with autocast(self.precision, self.device):
                image_emb, text_emb = model.embed_pair(batch)
            outputs, grads = [image_emb.float(), text_emb.float()], [image_slice, text_slice]
            if self.sharded and last:
                with autocast(self.precision, self.device):
                    head = self._weighted(model.pair_losses(image_all.detach(), text_all.detach()))
                outputs.append(head)
                grads.append(torch.ones_like(head))
            torch.autograd.backward(outputs, grads)
        _set_rng_state(after, self.device)
        if not self.sharded:
            dist.average_gradients(params)
        return {"loss": total.item(), **{name: value.item() for name, value in losses.items()}}

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not (self.show_progress and dist.is_main()),
        )

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until `train.steps` (or `stop_at`, as if killed there), checkpointing every
        `ckpt_every` steps and at the end."""
        cfg = self.cfg.train
        last = min(cfg.steps, stop_at or cfg.steps)
        self.model.train()
        image_size = self.model.image_size()  # None: a text-only recipe, no images decoded
        transform = train_transform(image_size, scale=self.cfg.data.crop_scale) if image_size else None
        collator = Collator(
            self.tokenizer, self.model.text_config().context_length, self.model.tokenizer_style, self.cfg.data.prompt
        )
        loader = (streaming_loader if self.cfg.data.streaming else train_loader)(
            TrainSet(self.dataset, transform, cfg.seed, self.cfg.data.text),
            collator,
            self.global_batch(),
            cfg.seed,
            self.position,
            dist.rank(),
            dist.world_size(),
            self.cfg.data.workers,
        )
        try:
            return self._fit_loop(iter(loader), last)
        except RuntimeError as err:
            if dist.is_distributed() and dist.is_timeout(err):
                raise rundir.RunError(
                    f"rank {dist.rank()}: another rank did not answer for "
                    f"{cfg.dist_timeout:g} s (train.dist_timeout), so the job stops; "
                    "the last checkpoint is intact for --resume"
                ) from err
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Flush TensorBoard and release the run directory's lock (`fit` does when it ends)."""
        if self.board is not None:
            self.board.close()
        if self.lock is not None:
            self.lock.release()
        if getattr(self, "own_group", False):
            fsdp.release_process_group()
            self.own_group = False

    def _fit_loop(self, batches, last: int) -> dict[str, float]:
        cfg, values = self.cfg.train, {}
        with self._progress() as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, rate="", loss="")
            window_start, window_steps = time.perf_counter(), 0
            while self.step < last:
                values = self.train_step(batches)
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    steps_per_s = window_steps / elapsed
                    values.update(
                        step=self.step,
                        epoch=self.epoch,
                        steps_per_s=steps_per_s,
                        samples_per_s=steps_per_s * self.global_batch() * cfg.accum,
                    )
                    self._log(values)
                    bar.update(
                        task,
                        rate=f"{steps_per_s:.2f} it/s {values['samples_per_s']:.0f} samples/s",
                        loss=f"{values['loss']:.4f}",
                    )
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(task, completed=self.step)
                if self.step % cfg.ckpt_every == 0 or self.step == last:
                    self._save()
        return values


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's random state on the CPU and, for a CUDA device, on it."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _skip_summary(skips: list[Skipped]) -> dict[str, Any]:
    """A metrics.jsonl record's view of skipped samples: the count and the first 100."""
    return {"count": len(skips), "samples": [f"{s.source}: {s.reason}" for s in skips[:100]]}


def train_run(
    recipe: str,
    out: Path,
    config: Path | None = None,
    overrides: list[str] | None = None,
    init: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    allow_changes: bool = False,
) -> dict[str, float]:
    """What `vlp train` does: the run config, then training; returns the last logged values.

    A fresh run takes `config` (default: the recipe's tiny.yaml; with `init`, the pretrained run's
    architecture, see `load_run_config`) plus `overrides`. A resumed run takes its own
    config.yaml plus `overrides`, refusing changes that break exactness unless `allow_changes`
    (see `vlp.train.rundir.resume_config`).
    """
    from vlp.config import load_run_config, load_yaml

    if resume:
        cfg = rundir.resume_config(Path(out), recipe, config, overrides, allow_changes)
    else:
        pretrained = load_yaml(ckpt.run_of(init) / "config.yaml") if init is not None else None
        cfg = load_run_config(recipe, config, list(overrides or []), pretrained=pretrained, model_fields=config_fields)
    return Trainer(cfg, out, resume=resume, init=init, progress=progress, overwrite=overwrite).fit()
