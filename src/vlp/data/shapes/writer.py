"""Writing the world to disk: `write_shapes` puts splits under a folder in the formats the
real-data readers read (WebDataset shards, JSON lines or a CSV with image files), with info.json."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from PIL import Image
from rich.progress import MofNCompleteColumn, Progress

from vlp.data.formats import write_webdataset
from vlp.data.shapes.language import PROMPT_TEMPLATES
from vlp.data.shapes.scene import COLORS, HELD_OUT, SHAPES
from vlp.data.shapes.tasks import class_names
from vlp.data.shapes.world import SPLITS, ShapesWorld

FORMATS = ("wds", "jsonl", "csv")

Record = tuple[int, bytes, list[str], dict]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _save_png(out: Path, split: str, i: int, png: bytes) -> str:
    path = f"{split}/{split}_{i:08d}.png"
    (out / path).write_bytes(png)
    return path


def _write_wds(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    samples = ((f"{split}_{i:08d}", png, {"caption": captions, **meta}) for i, png, captions, meta in records)
    write_webdataset(out / split, split, samples, shard_size)


def _write_jsonl(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    with open(out / f"{split}.jsonl", "w") as f:
        for i, png, captions, meta in records:
            path = _save_png(out, split, i, png)
            f.write(json.dumps({"image": path, "caption": captions, **meta}) + "\n")


def _write_csv(out: Path, split: str, records: Iterator[Record], shard_size: int) -> None:
    with open(out / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        for i, png, captions, _ in records:
            path = _save_png(out, split, i, png)
            writer.writerows([path, caption] for caption in captions)


_WRITERS: dict[str, Callable[[Path, str, Iterator[Record], int], None]] = {
    "wds": _write_wds,
    "jsonl": _write_jsonl,
    "csv": _write_csv,
}


def _records(world: ShapesWorld, split: str, count: int, advance: Callable[[], None]) -> Iterator[Record]:
    for i in range(count):
        sample = world.sample(split, i)
        yield i, _png(sample.image), sample.captions, sample.meta
        advance()


def write_shapes(
    out: Path,
    counts: dict[str, int],
    *,
    seed: int = 0,
    image_size: int = 64,
    noise: float = 0.0,
    format: str = "wds",
    shard_size: int = 5000,
    progress: bool = True,
) -> dict:
    """Write the given number of samples of each split under `out`; returns info.json's dict."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    for split, count in counts.items():
        if split not in SPLITS:
            raise ValueError(f"counts: unknown split {split!r}; expected one of {SPLITS}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"counts[{split!r}] must be a non-negative integer, got {count!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size!r}")
    world = ShapesWorld(seed=seed, image_size=image_size, noise=noise)
    out = Path(out)
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not progress) as bar:
        for split, count in counts.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            task = bar.add_task(f"shapes {split}", total=count)
            records = _records(world, split, count, partial(bar.advance, task))
            _WRITERS[format](out, split, records, shard_size)
    info = {
        "version": 1,
        "format": format,
        "seed": seed,
        "image_size": image_size,
        "noise": noise,
        "splits": dict(counts),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "held_out": [list(pair) for pair in HELD_OUT],
        "prompt_templates": list(PROMPT_TEMPLATES),
        "classes": {task: class_names(task) for task in ("shape", "color", "color_shape")},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
