"""A searchable index of an image collection: `vlp index build` and `vlp index search`.

An index is a directory:

    info.json                    the model, its recipe, the dimension, the count, the kind of faiss
                                 index and (approximate kinds) its recall@10 against exact search
    meta.sqlite                  one row per image: path (a file, or a data set's "shard#key"),
                                 size and mtime of the file holding it, sha256, caption (images
                                 from a data set with captions), its shard and row in it
    embeddings/000001.safetensors  normalised image embeddings, one shard per build batch
    index.faiss                  faiss over every row of meta.sqlite, in row id order

A build is incremental: new images are embedded, changed ones (size or mtime of their file)
re-embedded, deleted ones dropped, the rest skipped. It is safe to kill: a batch's shard is
written (atomically) before its rows are committed, so a kill leaves at most an orphan shard,
removed by the next run, which then embeds exactly the images the killed one had not committed;
the result equals an uninterrupted build. faiss is exact (`IndexFlatIP`) up to `exact_limit`
images, HNSW above."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from vlp.apps.ability import require
from vlp.apps.inputs import ImageEntry, batched, count_images, image_entries, image_sources
from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import CaptionDataset, load_image, read_tar_image
from vlp.data.sample import DataError, Skipped
from vlp.data.transforms import eval_transform, model_images
from vlp.eval.encode import embed_texts, itm_pair_scores, tokenize_texts
from vlp.models.recipe import Recipe
from vlp.train.precision import autocast, resolve_precision

SCHEMA = """CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime REAL, sha256 TEXT,
    shard INTEGER NOT NULL, row INTEGER NOT NULL, caption TEXT, file TEXT)"""
ADDED_COLUMNS = ("caption TEXT", "file TEXT")  # absent from indexes built before they were
HNSW_NEIGHBOURS, RECALL_QUERIES, TARGET_RECALL = 32, 1000, 0.95
HNSW_SEARCH_DEPTHS = (64, 128, 256, 512, 1024)  # efSearch tried in turn; the index keeps the last
CHUNK = 8192  # images listed, checked against the index and embedded at a time: bounds memory
Progress = Callable[[int, int], None]  # (images done since the last call, images in all)


class _Entries(Dataset):
    """Entry i -> (i, eval-transformed image, sha256) or (i, None, "key: reason"); decoded in
    the loader's workers."""

    def __init__(self, entries: list[ImageEntry], image_size: int, max_pixels: int):
        self.entries, self.transform, self.max_pixels = entries, eval_transform(image_size), max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            data, image = self.entries[i].read(self.max_pixels)
        except DataError as err:
            return i, None, str(err)
        return i, self.transform(image), hashlib.sha256(data).hexdigest()


def _collate(items: list) -> list:
    return items


def build(
    model: Recipe,
    paths: Iterable[Path | CaptionDataset],
    out: Path,
    model_source: str = "",
    batch_size: int = 64,
    workers: int | None = None,
    exact_limit: int = 100_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Build or update the index `out` of the images of `paths` (files, folders, data sets:
    `vlp.apps.inputs`); returns its info.json, with the images skipped this run ("skipped":
    ["path: reason", ...]). `precision`: fp32, bf16 autocast, or auto (bf16 where its matmuls
    are measured faster, `vlp.train.precision`); an index keeps the precision it was first
    built with, so that its embeddings stay comparable; a model whose weights changed since
    (retrained at the same path) re-embeds every image. `workers`: decoding processes (default
    `decode_workers`). Memory is bounded: images are listed, checked and embedded `CHUNK` at a
    time, and faiss is filled shard by shard."""
    require(model, "search")
    device = next(model.parameters()).device
    workers = decode_workers(device) if workers is None else workers
    out, model_source = Path(out), _absolute(model_source)
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    info_path = out / "info.json"
    previous = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if previous and _absolute(previous.get("model", "")) != model_source:
        raise DataError(f"{out}: built with model {previous.get('model')!r}, not {model_source!r}; use a fresh --out")
    precision = resolve_precision(previous.get("precision", precision), device)
    sources = image_sources(paths, max_pixels)
    total = count_images(sources) if progress else 0
    db = _open_db(out)
    weights = weights_fingerprint(model)
    if previous.get("weights", weights) != weights:  # retrained since: every embedding is stale
        with db:
            db.execute("DELETE FROM images")
        _write_json(info_path, {**previous, "weights": weights})
    _remove_orphan_shards(db, out)
    embed = _Embedder(model, db, out, batch_size, workers, max_pixels, precision)
    skipped: list[str] = []
    for number, chunk in enumerate(batched(image_entries(sources), CHUNK)):
        skipped += [f"{skip.source}: {skip.reason}" for skip in chunk if isinstance(skip, Skipped)]
        entries = [entry for entry in chunk if isinstance(entry, ImageEntry)]
        skipped += embed(_sync(db, entries, number))
        if progress:
            progress(len(entries), total)
    with db:
        db.execute("DELETE FROM images WHERE path NOT IN (SELECT path FROM seen)")  # gone since
    _remove_orphan_shards(db, out)
    info = _write_faiss(db, out, exact_limit)
    info.update(model=model_source, weights=weights, recipe=model.recipe, precision=precision, skipped=skipped)
    _write_json(info_path, info)
    db.close()
    return info


def _absolute(model_source: str) -> str:
    """A local model path made absolute (the index is then usable from any folder); a hub id
    or a name as given."""
    return str(Path(model_source).resolve()) if model_source and Path(model_source).exists() else model_source


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's weights: tells a retrained model at the same path from the one an
    index was built with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def decode_workers(device: torch.device) -> int:
    """Processes decoding images beside the encoder: the cores it leaves idle (on a CPU, those
    beyond torch's threads; beside a GPU, all but one), at most 8. On a 2-core CPU none, as
    workers there take cores from the encoder's threads (docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    spare = cores - 1 if device.type == "cuda" else cores - torch.get_num_threads()
    return max(0, min(8, spare))


def _open_db(out: Path) -> sqlite3.Connection:
    """meta.sqlite, its columns brought up to date, with an empty on-disk table `seen` of the
    images listed by this run."""
    db = sqlite3.connect(out / "meta.sqlite")
    db.execute(SCHEMA)
    columns = {name for _, name, *_ in db.execute("PRAGMA table_info(images)")}
    for column in ADDED_COLUMNS:
        if column.split()[0] not in columns:
            db.execute(f"ALTER TABLE images ADD COLUMN {column}")
    db.execute("PRAGMA temp_store = FILE")
    db.execute("CREATE TEMP TABLE seen (path TEXT PRIMARY KEY, chunk INTEGER)")
    return db


def _sync(db: sqlite3.Connection, entries: list[ImageEntry], chunk: int) -> list[ImageEntry]:
    """Record `entries` as seen and drop the rows of the changed ones; return the entries to
    embed (new or changed, one per key; a file that cannot be read is tried, and skipped)."""
    todo, stamps = [], {}
    with db:
        for entry in entries:
            if db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (entry.key, chunk)).rowcount:
                stamps[entry.key] = _stamp(entry.file)
                todo.append(entry)
        query = "SELECT i.path, i.size, i.mtime FROM images i JOIN seen s ON s.path = i.path WHERE s.chunk = ?"
        known = {path: (size, mtime) for path, size, mtime in db.execute(query, (chunk,))}
        stale = [path for path, stamp in known.items() if stamps.get(path) != stamp]
        db.executemany("DELETE FROM images WHERE path = ?", [(path,) for path in stale])
    kept = set(known) - set(stale)
    return [entry for entry in todo if entry.key not in kept]


def _stamp(path: str) -> tuple[int, float] | None:
    """What tells a changed file from an unchanged one (one stat call); None if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime


def _remove_orphan_shards(db: sqlite3.Connection, out: Path) -> None:
    """Shards no row points at (written by a run killed before it committed them, or replaced),
    and half-written ones (`.tmp`)."""
    used = {shard for (shard,) in db.execute("SELECT DISTINCT shard FROM images")}
    for half in (out / "embeddings").glob("*.tmp"):
        half.unlink()
    for shard in (out / "embeddings").glob("*.safetensors"):
        if int(shard.stem) not in used:
            shard.unlink()


class _Embedder:
    """Embeds lists of entries batch by batch, each batch's shard written before its rows are
    committed, shards numbered on from the index's last."""

    def __init__(self, model, db, out, batch_size, workers, max_pixels, precision):
        self.model, self.db, self.out = model, db, out
        self.batch_size, self.workers, self.max_pixels, self.precision = batch_size, workers, max_pixels, precision
        self.device = next(model.parameters()).device
        (self.last_shard,) = db.execute("SELECT COALESCE(MAX(shard), 0) FROM images").fetchone()

    def __call__(self, entries: list[ImageEntry]) -> list[str]:
        """Embed and record `entries`; returns the skipped ones as "key: reason"."""
        if not entries:
            return []
        dataset = _Entries(entries, self.model.image_size(), self.max_pixels)
        loader = DataLoader(dataset, self.batch_size, num_workers=self.workers, collate_fn=_collate)
        skipped = []
        for batch in loader:
            good = [(i, image, digest) for i, image, digest in batch if image is not None]
            skipped += [reason for _, image, reason in batch if image is None]
            if good:
                self._record([entries[i] for i, _, _ in good], [image for _, image, _ in good], [d for *_, d in good])
        return skipped

    def _record(self, entries: list[ImageEntry], images: list[torch.Tensor], digests: list[str]) -> None:
        with torch.no_grad(), autocast(self.precision, self.device):
            emb = self.model.encode_image(torch.stack(images).to(self.device)).float().cpu()
        if emb.dim() != 2:
            raise TypeError(
                f"recipe {self.model.recipe!r} gives {emb.dim() - 1}-d image embeddings; an index "
                "needs one vector per image"
            )
        self.last_shard += 1
        path = self.out / "embeddings" / f"{self.last_shard:06d}.safetensors"
        save_file({"embeddings": emb.contiguous()}, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)
        rows = [
            (entry.key, *(_stamp(entry.file) or (None, None)), digest, self.last_shard, row, entry.caption, entry.file)
            for row, (entry, digest) in enumerate(zip(entries, digests))
        ]
        with self.db:
            self.db.executemany(
                "INSERT INTO images (path, size, mtime, sha256, shard, row, caption, file) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )


def vector_blocks(db: sqlite3.Connection, out: Path) -> Iterator[np.ndarray]:
    """Every row's embedding in row id order, one block per run of rows from the same shard
    (one shard in memory at a time)."""
    shard_id, shard, block = None, None, []
    for sid, row in db.execute("SELECT shard, row FROM images ORDER BY id"):
        if sid != shard_id:
            if block:
                yield shard[block].numpy()
            shard_id, block = sid, []
            shard = load_file(str(out / "embeddings" / f"{sid:06d}.safetensors"))["embeddings"]
        block.append(row)
    if block:
        yield shard[block].numpy()


def new_faiss(count: int, dim: int, exact_limit: int) -> faiss.Index:
    """Exact inner-product search up to `exact_limit` vectors, HNSW above it."""
    if count <= exact_limit:
        return faiss.IndexFlatIP(dim)
    return faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)


def tune(index: faiss.Index) -> dict[str, Any]:
    """The index's info; for HNSW, its recall@10 against exact search, measured with a seeded
    sample of its own vectors as queries against its flat storage (no second copy), and its
    search depth (efSearch) set to the smallest of HNSW_SEARCH_DEPTHS reaching TARGET_RECALL."""
    count, dim = index.ntotal, index.d
    if not isinstance(index, faiss.IndexHNSW):
        return {"kind": "exact", "count": count, "dimension": dim}
    sample = random.Random(0).sample(range(count), min(RECALL_QUERIES, count))
    queries = np.stack([index.storage.reconstruct(i) for i in sample])
    k = min(10, count)
    truth = index.storage.search(queries, k)[1]
    for depth in HNSW_SEARCH_DEPTHS:  # the shallowest search that reaches the target recall
        index.hnsw.efSearch = depth
        found = index.search(queries, k)[1]
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        if recall >= TARGET_RECALL:
            break
    return {"kind": "hnsw", "count": count, "dimension": dim, "recall_at_10": recall, "ef_search": depth}


def faiss_index(vectors: np.ndarray, exact_limit: int) -> tuple[faiss.Index, dict[str, Any]]:
    """`new_faiss` over `vectors`, tuned."""
    index = new_faiss(*vectors.shape, exact_limit)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, tune(index)


def _write_faiss(db: sqlite3.Connection, out: Path, exact_limit: int) -> dict[str, Any]:
    (count,) = db.execute("SELECT COUNT(*) FROM images").fetchone()
    if not count:
        raise DataError(f"{out}: no image could be indexed")
    index = None
    for block in vector_blocks(db, out):
        index = index or new_faiss(count, block.shape[1], exact_limit)
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    info = tune(index)
    faiss.write_index(index, str(out / ".index.faiss.tmp"))
    os.replace(out / ".index.faiss.tmp", out / "index.faiss")
    return info


class Index:
    """An index built by `build`, searched by text or by image (`Index.open(path).search(...)`).
    Safe to search from several threads; rows are read from meta.sqlite per search, so only
    faiss and one row id per image stay in memory."""

    def __init__(self, path: Path, model: Recipe):
        self.path, self.model = Path(path), model
        self.info = json.loads((self.path / "info.json").read_text())
        self.faiss = faiss.read_index(str(self.path / "index.faiss"))
        with self._db() as db:  # faiss's position i holds the i-th row by id
            self.ids = np.fromiter((i for (i,) in db.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path, model: Recipe | None = None) -> Index:
        """The index at `path`, with the model it was built with (loaded from info.json's
        "model" unless given)."""
        if model is None:
            from vlp.api import load

            model = load(json.loads((Path(path) / "info.json").read_text())["model"])
        return cls(Path(path), model)

    def __len__(self) -> int:
        return len(self.ids)

    def _db(self) -> closing[sqlite3.Connection]:
        """A read-only connection to meta.sqlite, closed on leaving `with`."""
        return closing(sqlite3.connect(f"file:{self.path / 'meta.sqlite'}?mode=ro", uri=True))

    def rows(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{id: {"id", "path", "caption"}} of the rows `ids` that exist."""
        ids = [int(i) for i in ids]
        marks = ",".join("?" * len(ids))
        with self._db() as db:
            found = db.execute(f"SELECT id, path, caption FROM images WHERE id IN ({marks})", ids).fetchall()
        return {i: {"id": i, "path": path, "caption": caption} for i, path, caption in found}

    def image(self, id: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The indexed image of row `id` (a file, or a member of a tar shard); KeyError if the
        index has no such row."""
        with self._db() as db:
            row = db.execute("SELECT path, COALESCE(file, path) FROM images WHERE id = ?", (int(id),)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no image {id}")
        path, file = row
        return load_image(path, max_pixels) if path == file else read_tar_image(file, path[len(file) + 1 :], max_pixels)

    @torch.no_grad()
    def search(
        self, query: str | Image.Image, k: int = 10, rerank: str | None = None, shortlist: int = 50
    ) -> list[dict[str, Any]]:
        """The `k` best images for a text or an image: [{"id", "path", "caption", "score"}],
        best first ("caption" None unless indexed from a data set with captions). With
        `rerank="itm"` (text queries, recipes with ITM), the `shortlist` best by embedding
        similarity are re-scored by the ITM head (BLIP Sec. 4, retrieval)."""
        if isinstance(query, str):
            vector = embed_texts(self.model, [query])
        else:
            vector = self.model.encode_image(model_images(self.model, [query])).cpu()
        (hits,) = self.search_vectors(vector, [max(k, shortlist if rerank else k)])
        if rerank is not None:
            hits = self._itm_reranked(query, hits)
        return hits[:k]

    def search_vectors(self, vectors: torch.Tensor, ks: list[int]) -> list[list[dict[str, Any]]]:
        """For each query embedding (a row of `vectors`, from this index's model), its `ks[i]`
        best images as `search` gives them: one faiss search and one metadata read for all."""
        depth = min(max(ks), len(self))
        scores, positions = self.faiss.search(np.ascontiguousarray(vectors.float().numpy()), depth)
        found = [
            [(float(s), int(self.ids[p])) for s, p in zip(row_s, row_p) if p >= 0]
            for row_s, row_p in zip(scores, positions)
        ]
        rows = self.rows({i for hits in found for _, i in hits})
        return [[{**rows[i], "score": s} for s, i in hits if i in rows][:k] for hits, k in zip(found, ks)]

    def _itm_reranked(self, query: str | Image.Image, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(query, str) or not self.model.has_itm():
            raise TypeError(
                f"--rerank itm needs a text query and a recipe with a trained ITM head, not {self.model.recipe!r}"
            )
        tokens = tokenize_texts(self.model, [query] * len(hits))
        images = [self.image(hit["id"]) for hit in hits]
        scores = itm_pair_scores(
            self.model, images, tokens["input_ids"], tokens["attention_mask"], torch.arange(len(hits))
        )
        ranked = sorted(zip(scores.tolist(), hits), key=lambda pair: -pair[0])
        return [{**hit, "score": score} for score, hit in ranked]
