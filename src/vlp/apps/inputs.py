"""What the applications read: image files, folders of them (recursively) and data sets in any
format vlp reads, one image at a time, an unreadable one reported rather than fatal.

Folders are walked lazily, so that a collection of a million files is never held as a list:
`image_sources` opens the data sets among the paths (they are held by their reader anyway),
`image_entries` then yields one `ImageEntry` per image, and `read_images` decodes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

from PIL import Image

from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import IMAGE_EXTENSIONS, CaptionDataset, decode_image, open_dataset
from vlp.data.sample import DataError, Skipped

T = TypeVar("T")
Source = Path | CaptionDataset  # an image file or a folder, or an opened data set
LISTINGS = ("*.tar", "*.jsonl", "*.csv", "*.tsv")  # a folder holding one of these is a data set


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One image to read: a file (`dataset` None, `key` its path) or item `item` of a data set
    (`key` its source: the image's path, or "shard#key" for a tar member)."""

    key: str
    dataset: CaptionDataset | None = None
    item: int = -1

    @property
    def file(self) -> str:
        """The file holding the image (a tar shard for a member)."""
        return self.key if self.dataset is None else self.dataset.image_file(self.item)

    @property
    def caption(self) -> str | None:
        """The data set's first caption of the image, if any."""
        captions = self.dataset.captions(self.item) if self.dataset is not None else []
        return captions[0] if captions else None

    def read_bytes(self) -> bytes:
        return Path(self.key).read_bytes() if self.dataset is None else self.dataset.image_bytes(self.item)

    def read(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, Image.Image]:
        """The encoded bytes and the decoded RGB image; DataError "key: reason" if they cannot
        be read or decoded."""
        try:
            data = self.read_bytes()
        except OSError as err:
            reason = "missing image: no such file" if isinstance(err, FileNotFoundError) else f"unreadable: {err}"
            raise DataError(f"{self.key}: {reason}") from None
        return data, decode_image(data, self.key, max_pixels)


def image_sources(paths: Iterable[Path | CaptionDataset], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Source]:
    """`paths` with the data sets among them opened: a listing file, or a folder holding
    shards or listings (`LISTINGS`), read with `open_dataset`; image files, other folders and
    missing paths (reported when read) are kept as paths."""
    sources: list[Source] = []
    for path in paths:
        if isinstance(path, CaptionDataset):
            sources.append(path)
        elif _is_dataset(Path(path)):
            sources.append(open_dataset(path, max_pixels=max_pixels))
        else:
            sources.append(Path(path))
    return sources


def _is_dataset(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() not in IMAGE_EXTENSIONS
    return path.is_dir() and any(next(path.glob(pattern), None) for pattern in LISTINGS)


def image_entries(sources: Iterable[Source]) -> Iterator[ImageEntry | Skipped]:
    """Every image of `sources`, lazily, and the data sets' listing-time skips."""
    for source in sources:
        if isinstance(source, CaptionDataset):
            yield from source.skipped
            yield from (ImageEntry(source.entries[i].source, source, i) for i in range(len(source)))
        elif source.is_dir():
            yield from (ImageEntry(str(path)) for path in walk_images(source))
        else:
            yield ImageEntry(str(source))  # a file, or a missing path reported when read


def count_images(sources: Iterable[Source]) -> int:
    """How many images `image_entries` yields (a walk of the folders, nothing decoded)."""
    return sum(1 for entry in image_entries(sources) if isinstance(entry, ImageEntry))


def walk_images(folder: Path) -> Iterator[Path]:
    """The image files under `folder`, lazily: each directory in name order, recursively;
    hidden files and folders left out, symbolic links to folders not followed."""
    try:
        children = sorted(os.scandir(folder), key=lambda child: child.name)
    except OSError:  # unreadable or vanished meanwhile: nothing to list
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir(follow_symlinks=False):
            yield from walk_images(Path(child.path))
        elif child.is_file() and os.path.splitext(child.name)[1].lower() in IMAGE_EXTENSIONS:
            yield Path(child.path)


def read_images(
    paths: Iterable[Path | CaptionDataset], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[str, Image.Image | Skipped]]:
    """(source, image or Skipped) for every image of `paths`: an image file; a folder, walked
    with `walk_images`; a data set (a listing file, or a folder of shards or listings)."""
    for entry in image_entries(image_sources(paths, max_pixels)):
        if isinstance(entry, Skipped):
            yield entry.source, entry
            continue
        try:
            yield entry.key, entry.read(max_pixels)[1]
        except DataError as err:
            yield entry.key, Skipped(entry.key, str(err).removeprefix(f"{entry.key}: "))


def over_images(
    paths: Iterable[Path],
    work: Callable[[list[Image.Image]], list[T]],
    batch_size: int = 32,
    on_skip: Callable[[Skipped], None] = lambda skip: None,
) -> Iterator[tuple[str, T]]:
    """(source, work's result) for every readable image of `paths`, `work` called on batches of
    `batch_size` images; `on_skip` is called with each unreadable one, in order."""
    for batch in batched(read_images(paths), batch_size):
        readable = [(source, image) for source, image in batch if not isinstance(image, Skipped)]
        for _, image in batch:
            if isinstance(image, Skipped):
                on_skip(image)
        if readable:
            yield from zip([source for source, _ in readable], work([image for _, image in readable]))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last one shorter)."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch
