"""Webdataset shards streamed from disk, in an order that is a pure function of (seed, position).

For data that does not fit in memory (`read_webdataset` holds every image's bytes). The stream
is the in-memory loader's (`vlp.data.loader`) with shards in place of samples:

- **Order.** Each source's samples come shard by shard, in tar order inside a shard. Without
  `resampled`, pass k over a source visits its shards in the permutation drawn from
  (seed, source, k), so an epoch reads every sample exactly once. With `resampled`, draw d picks
  a shard uniformly with replacement from (seed, source, d), and epochs are `samples_per_epoch`
  samples long.
- **Mixing.** With several sources, positions are dealt in blocks of `MIX_BLOCK`: source s gets
  floor(n F_s) - floor(n F_{s-1}) of the first n = b * MIX_BLOCK positions (F: cumulative weight
  fractions, exact rationals), so every block honours the weights to within one sample, and the
  block's sources are shuffled by (seed, block). A position's place in its source's own stream
  is then known from its block alone.
- **Ranks and workers.** Global batch b holds positions [b G, (b + 1) G); rank r takes its slice
  of G / R; DataLoader worker w of W makes the rank's batches b = w, w + W, ... The DataLoader
  hands batches out round-robin over its workers, so what comes out is the stream in order for
  any W, and a resumed run (`start` = the checkpoint's position) continues it exactly, whatever
  W it has now.
- **Finding a position.** Each shard's sample count is counted once (tar headers only, image
  bytes are seeked over) and kept in `SHARD_INDEX` beside the shards (written atomically; kept
  in memory where the folder is read-only), keyed by name, size and mtime. Reaching a position
  then skips whole shards by their counts, then groups inside one shard, reading headers only.
  Every worker reads only the image bytes of its own samples.

A sample is a group of consecutive tar members with the same key (webdataset's `base_plus_ext`
convention), read as `read_webdataset` reads it. An unreadable sample is a `Skipped` at its
position, counted by the trainer in its epoch. A shard that cannot be read to its end (not a
tar, truncated) is a listing skip; its samples before the damage stay in the stream.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from vlp import distributed as dist
from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import (
    WEBDATASET_IMAGE_KEYS,
    _Bad,
    _decode,
    _find_in_directory,
    _resolve_shards,
    _tar_entry,
)
from vlp.data.loader import Collator, TrainSet, loader_options
from vlp.data.sample import DataError, Sample, Skipped

SHARD_INDEX = ".vlp-shard-index.json"  # beside the shards: {name: {"size", "mtime_ns", "samples", "error"}}
MIX_BLOCK = 1024  # positions per block in which mixed sources get their weighted share
TEXT_KEYS, LABEL_KEYS = ("json", "txt"), ("cls",)
_OPEN_READERS = 4  # open shards kept per source (a resampled stream may come back to one)


class _ShardReader:
    """The sample groups of one shard in tar order, read forwards. Skipping a group reads its
    headers only: a tar file opened for random access seeks over member data."""

    def __init__(self, path: str):
        self.path, self.next = path, 0  # the index of the group `advance` returns next
        self.error: str | None = None
        self.tar: tarfile.TarFile | None = None
        self._groups = self._walk()

    def _walk(self) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
        try:
            self.tar = tarfile.open(self.path)
            plain = isinstance(self.tar.fileobj, io.BufferedReader)  # not compressed: sizes are offsets
            end = os.fstat(self.tar.fileobj.fileno()).st_size if plain else None
            key, members = None, []
            for info in self.tar:
                if not info.isreg():
                    continue
                if "/" not in info.name and info.name.startswith("__") and info.name.endswith("__"):
                    continue  # webdataset's meta members
                if end is not None and info.offset_data + info.size > end:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                prefix, _ = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != key and members:
                    yield key, members
                    members = []
                key = prefix
                members.append(info)
            if members:
                yield key, members
        except Exception as exc:  # untrusted bytes: tarfile raises more than TarError
            self.error = f"corrupt shard: {type(exc).__name__}: {exc}"

    def advance(self, to: int) -> tuple[str, list[tarfile.TarInfo]] | None:
        """Group `to` (>= `self.next`), skipping the groups before it; None past the end."""
        group = None
        while self.next <= to:
            group = next(self._groups, None)
            if group is None:
                return None
            self.next += 1
        return group

    def read(self, members: list[tarfile.TarInfo], skip: tuple[str, ...] = ()) -> dict[str, bytes]:
        """{extension: bytes} of a group's members (extensions in `skip`: b"", not read)."""
        out = {}
        for info in members:
            ext = base_plus_ext(info.name)[1].lower()
            out[ext] = b"" if ext in skip else self.tar.extractfile(info).read()
        return out

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def count_samples(path: str) -> tuple[int, str | None]:
    """The number of sample groups of a shard, and why it could not be read to its end."""
    reader = _ShardReader(path)
    n = 0
    while reader.advance(n) is not None:
        n += 1
    reader.close()
    return n, reader.error


def shard_counts(shards: list[str]) -> list[tuple[int, str | None]]:
    """(samples, error) per shard, from each folder's `SHARD_INDEX` where it still describes the
    file (name, size and mtime), else counted and written back atomically."""
    out = []
    by_folder: dict[str, list[str]] = {}
    for shard in shards:
        by_folder.setdefault(os.path.dirname(os.path.abspath(shard)), []).append(shard)
    counted: dict[str, tuple[int, str | None]] = {}
    for folder, members in by_folder.items():
        index_path = Path(folder) / SHARD_INDEX
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        changed = False
        for shard in members:
            stat, name = os.stat(shard), os.path.basename(shard)
            entry = index.get(name)
            if not (isinstance(entry, dict) and entry.get("size") == stat.st_size):
                entry = None
            if entry is None or entry.get("mtime_ns") != stat.st_mtime_ns:
                samples, error = count_samples(shard)
                entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "samples": samples, "error": error}
                index[name], changed = entry, True
            counted[shard] = (entry["samples"], entry["error"])
        if changed:
            tmp = index_path.with_name(f"{SHARD_INDEX}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
                os.replace(tmp, index_path)
            except OSError:  # a read-only folder: counted again next time
                tmp.unlink(missing_ok=True)
    for shard in shards:
        out.append(counted[shard])
    return out


class _Source:
    """One source's own endless stream: local position -> (shard, group index in the shard)."""

    def __init__(self, index: int, shards: list[str], counts: list[int], seed: int, resampled: bool):
        self.index, self.shards, self.counts, self.seed, self.resampled = index, shards, counts, seed, resampled
        self.total = sum(counts)
        self._pass: tuple[int, list[int], list[int]] | None = None  # (pass, shard order, cumulative ends)
        self._draws: list[int] = []  # resampled: the shard of each draw
        self._ends: list[int] = []  # resampled: cumulative sample count after each draw

    def _order(self, k: int) -> tuple[list[int], list[int]]:
        if self._pass is None or self._pass[0] != k:
            order = list(range(len(self.shards)))
            random.Random(f"{self.seed}:shards:{self.index}:{k}").shuffle(order)
            ends, total = [], 0
            for shard in order:
                total += self.counts[shard]
                ends.append(total)
            self._pass = (k, order, ends)
        return self._pass[1], self._pass[2]

    def _draw(self, d: int) -> int:
        return random.Random(f"{self.seed}:draw:{self.index}:{d}").randrange(len(self.shards))

    def locate(self, q: int) -> tuple[int, int, int]:
        """(shard, group in it, visit): `visit` tells two visits of one shard apart."""
        if not self.resampled:
            k, offset = divmod(q, self.total)
            order, ends = self._order(k)
            slot = bisect.bisect_right(ends, offset)
            return order[slot], offset - (ends[slot - 1] if slot else 0), k * len(order) + slot
        while not self._ends or self._ends[-1] <= q:
            shard = self._draw(len(self._draws))
            self._draws.append(shard)
            self._ends.append((self._ends[-1] if self._ends else 0) + self.counts[shard])
        d = bisect.bisect_right(self._ends, q)
        return self._draws[d], q - (self._ends[d - 1] if d else 0), d


class ShardStream:
    """The stream over webdataset shards: `len` = samples per epoch, `stream[position]` = the
    `Sample` or `Skipped` there. A `CaptionDataset` stand-in for `TrainSet`, the trainer's
    epoch bookkeeping and tokenizer training (`captions`)."""

    def __init__(
        self,
        sources: list[tuple[list[str], float]],
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if not sources:
            raise DataError("streaming: no source of shards")
        self.seed, self.resampled, self.strict, self.max_pixels = seed, resampled, strict, max_pixels
        self.skipped: list[Skipped] = []
        self.sources: list[_Source] = []
        weights = []
        for i, (shards, weight) in enumerate(sources):
            counts = []
            for shard, (samples, error) in zip(shards, shard_counts(shards)):
                counts.append(samples)
                if error is not None:
                    if strict:
                        raise DataError(f"{shard}: {error}")
                    self.skipped.append(Skipped(shard, error))
            self.sources.append(_Source(i, shards, counts, seed, resampled))
            weights.append(Fraction(weight))
        self.shard_samples = sum(s.total for s in self.sources)
        empty = [s.shards[0] for s in self.sources if not s.total]
        if empty and self.shard_samples:
            raise DataError(f"streaming: source of {empty[0]} has no readable sample")
        self.samples_per_epoch = samples_per_epoch or self.shard_samples
        total = sum(weights)
        self._bounds = [sum(weights[: i + 1]) / total for i in range(len(weights))]  # F_s
        self._block: tuple[int, list[int], list[int]] | None = None
        self._readers: dict[int, dict[tuple[str, int], _ShardReader]] = {}
        self.source = ", ".join(s.shards[0] for s in self.sources)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.shard_samples else 0

    def __repr__(self) -> str:
        return f"ShardStream({self.source!r}, {self.shard_samples} samples in shards, {len(self)} per epoch)"

    def __getstate__(self) -> dict[str, Any]:  # to DataLoader workers: no open files
        return {**self.__dict__, "_readers": {}}

    def epoch(self, position: int) -> int:
        return position // self.samples_per_epoch

    def _quota(self, n: int, s: int) -> int:
        """Positions among the first n (a multiple of MIX_BLOCK) that go to source s."""
        low = (n * self._bounds[s - 1]).__floor__() if s else 0
        return (n * self._bounds[s]).__floor__() - low

    def source_of(self, position: int) -> tuple[int, int]:
        """(source, position in the source's own stream)."""
        if len(self.sources) == 1:
            return 0, position
        b, offset = divmod(position, MIX_BLOCK)
        if self._block is None or self._block[0] != b:
            start = b * MIX_BLOCK
            counts = [self._quota(start + MIX_BLOCK, s) - self._quota(start, s) for s in range(len(self.sources))]
            deal = [s for s, n in enumerate(counts) for _ in range(n)]
            random.Random(f"{self.seed}:mix:{b}").shuffle(deal)
            self._block = (b, deal, [self._quota(start, s) for s in range(len(self.sources))])
        _, deal, before = self._block
        s = deal[offset]
        return s, before[s] + deal[:offset].count(s)

    def locate(self, position: int) -> tuple[int, str, int, int]:
        """(source, shard path, group index in the shard, visit) of a stream position."""
        s, q = self.source_of(position)
        source = self.sources[s]
        shard, group, visit = source.locate(q)
        return s, source.shards[shard], group, visit

    def _group(self, position: int, skip: tuple[str, ...] = ()) -> tuple[str, dict[str, bytes]] | Skipped:
        s, shard, group, visit = self.locate(position)
        readers = self._readers.setdefault(s, {})
        reader = readers.get((shard, visit))
        if reader is None or reader.next > group:
            if reader is not None:
                reader.close()
            reader = readers[(shard, visit)] = _ShardReader(shard)
            while len(readers) > _OPEN_READERS:
                readers.pop(next(iter(readers))).close()
        found = reader.advance(group)
        if found is None:  # the shard changed, or broke, since it was counted
            return self._failure(f"{shard}#{group}", reader.error or "corrupt shard: fewer samples than counted")
        key, members = found
        where = f"{shard}#{key}"
        try:
            return where, reader.read(members, skip)
        except Exception as exc:
            return self._failure(where, f"corrupt shard: {type(exc).__name__}: {exc}")

    def _failure(self, where: str, reason: str) -> Skipped:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        return Skipped(where, reason)

    def __getitem__(self, position: int) -> Sample | Skipped:
        got = self._group(position)
        if isinstance(got, Skipped):
            return got
        where, members = got
        try:
            entry = _tar_entry(members, where, WEBDATASET_IMAGE_KEYS, TEXT_KEYS, LABEL_KEYS)
            image = _decode(entry.image, self.max_pixels)
        except _Bad as bad:
            return self._failure(where, str(bad))
        return Sample(image, entry.captions, entry.meta, where)

    def key(self, position: int) -> str:
        """The sample's "shard#key" (its members not read)."""
        got = self._group(position, skip=(*WEBDATASET_IMAGE_KEYS, *TEXT_KEYS, *LABEL_KEYS))
        return got.source if isinstance(got, Skipped) else got[0]

    def captions(self, position: int) -> list[str]:
        """The captions at a position, its image not read ([] if unreadable)."""
        got = self._group(position, skip=WEBDATASET_IMAGE_KEYS)
        if isinstance(got, Skipped):
            return []
        try:
            return _tar_entry(got[1], got[0], WEBDATASET_IMAGE_KEYS, TEXT_KEYS, LABEL_KEYS).captions
        except _Bad:
            return []


def resolve_source(path: str, split: str | None) -> list[str]:
    """The shards of one source: `path/split/*.tar` or `path/*.tar` for a folder, else a file,
    glob or brace pattern (as `read_webdataset` takes)."""
    if os.path.isdir(path):
        try:
            return _resolve_shards(str(_find_in_directory(Path(path), split, "webdataset")[1]))
        except DataError:
            return _resolve_shards(path)
    return _resolve_shards(path)


def open_stream(data: Any, seed: int) -> ShardStream:
    """The stream a `DataConfig` (`data.streaming`) describes: `data.sources` (each {path,
    weight}) or else `data.path`, split `data.train_split`. Under torch.distributed the main
    process counts any uncounted shards first, so the others find them in the index."""
    listed = data.sources or [{"path": data.path}]
    sources = [(resolve_source(str(s["path"]), data.train_split), float(s.get("weight", 1.0))) for s in listed]

    def build() -> ShardStream:
        return ShardStream(sources, seed, data.resampled, data.samples_per_epoch, data.strict, data.max_pixels)

    if dist.is_distributed() and not dist.is_main():
        dist.barrier()
        return build()
    stream = build()
    if dist.is_distributed():
        dist.barrier()
    return stream


class ShardBatches(IterableDataset):
    """A rank's batches of `TrainSet` items over a `ShardStream`, from `start` on; worker w of
    W makes the rank's batches w, w + W, ..."""

    def __init__(self, dataset: TrainSet, global_batch: int, start: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.dataset, self.global_batch, self.start = dataset, global_batch, start
        self.rank, self.world_size = rank, world_size

    def positions(self, batch: int) -> range:
        """The stream positions of the rank's `batch`-th batch."""
        local = self.global_batch // self.world_size
        first = self.start + batch * self.global_batch + self.rank * local
        return range(first, first + local)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream: ShardStream = self.dataset.base
        batch = worker
        while True:
            yield [self.dataset[(stream.epoch(p), p)] for p in self.positions(batch)]
            batch += workers


def streaming_loader(
    dataset: TrainSet,
    collator: Collator,
    global_batch: int,
    seed: int,
    start: int,
    rank: int,
    world_size: int,
    workers: int,
) -> DataLoader:
    """`train_loader` for a `TrainSet` over a `ShardStream`: the same endless batches."""
    batches = ShardBatches(dataset, global_batch, start, rank, world_size)
    return DataLoader(batches, batch_size=None, **loader_options(collator, seed, workers))
