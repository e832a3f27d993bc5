"""What the applications read: image files, folders of them (recursively) and data sets in any
format vlp reads, one image at a time, an unreadable one reported rather than fatal."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TypeVar

from PIL import Image

from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import IMAGE_EXTENSIONS, load_image, open_dataset
from vlp.data.sample import DataError, Skipped

T = TypeVar("T")
LISTINGS = ("*.tar", "*.jsonl", "*.csv", "*.tsv")  # a folder holding one of these is a data set


def read_images(
    paths: Iterable[Path], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[str, Image.Image | Skipped]]:
    """(source, image or Skipped) for every image of `paths`: an image file; a folder, walked
    recursively in name order (hidden files and non-images left out); a data set (a listing
    file, or a folder of shards or listings), read with `open_dataset`."""
    for path in map(Path, paths):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            yield str(path), _load(path, max_pixels)
        elif path.is_dir() and not any(next(path.glob(pattern), None) for pattern in LISTINGS):
            yield from ((str(p), _load(p, max_pixels)) for p in folder_images(path))
        elif path.exists():
            dataset = open_dataset(path, max_pixels=max_pixels)
            yield from ((skip.source, skip) for skip in dataset.skipped)
            for i in range(len(dataset)):
                item = dataset[i]
                yield item.source, item if isinstance(item, Skipped) else item.image
        else:
            yield str(path), _load(path, max_pixels)  # missing: reported as such


def folder_images(folder: Path) -> list[Path]:
    """The image files under `folder`, walked recursively in name order; hidden files left out."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _load(path: Path, max_pixels: int) -> Image.Image | Skipped:
    try:
        return load_image(path, max_pixels)
    except DataError as err:
        return Skipped(str(path), str(err).removeprefix(f"{path}: "))


def over_images(
    paths: Iterable[Path],
    work: Callable[[list[Image.Image]], list[T]],
    batch_size: int = 32,
    skipped: list[Skipped] | None = None,
) -> Iterator[tuple[str, T]]:
    """(source, work's result) for every readable image of `paths`, `work` called on batches of
    `batch_size` images; unreadable ones are appended to `skipped`."""
    for batch in batched(read_images(paths), batch_size):
        readable = [(source, image) for source, image in batch if not isinstance(image, Skipped)]
        if skipped is not None:
            skipped += [image for _, image in batch if isinstance(image, Skipped)]
        if readable:
            yield from zip([source for source, _ in readable], work([image for _, image in readable]))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last one shorter)."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch
