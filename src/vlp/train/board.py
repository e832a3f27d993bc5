"""TensorBoard scalars beside metrics.jsonl (`train.log_to: [jsonl, tensorboard]`): the
training values of every logged step under train/, evaluation results under eval/, in
RUN/tensorboard (`tensorboard --logdir RUN`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

BOARD_DIR = "tensorboard"


def open_board(run_dir: Path, purge_step: int | None = None) -> Any:
    """A SummaryWriter into RUN/tensorboard. A resumed run passes its checkpoint's step as
    `purge_step`: what the interrupted run logged after it is hidden, as metrics.jsonl is cut."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("train.log_to lists tensorboard: pip install tensorboard (or 'vlp[tensorboard]')") from None
    return SummaryWriter(str(Path(run_dir) / BOARD_DIR), purge_step=purge_step)


def add_scalars(board: Any, prefix: str, values: dict[str, Any], step: int, leave_out: Iterable[str] = ()) -> None:
    """Every number in `values`, nested dicts flattened into tags "prefix/key/subkey"."""
    for key, value in values.items():
        if key in leave_out or isinstance(value, bool):
            continue
        if isinstance(value, dict):
            add_scalars(board, f"{prefix}/{key}", value, step)
        elif isinstance(value, (int, float)):
            board.add_scalar(f"{prefix}/{key}", value, step)
