"""A searchable index of an image collection: `vlp index build` and `vlp index search`.

An index is a directory:

    info.json                    the model, its recipe, the dimension, the count, the kind of faiss
                                 index and (approximate kinds) its recall@10 against exact search
    meta.sqlite                  one row per image: path, size, mtime, sha256, shard, row
    embeddings/000001.safetensors  normalised image embeddings, one shard per build batch
    index.faiss                  faiss over every row of meta.sqlite, in row id order

A build is incremental: new files are embedded, changed ones (size or mtime) re-embedded, deleted
ones dropped, the rest skipped. It is safe to kill: a batch's shard is written (atomically) before
its rows are committed, so a kill leaves at most an orphan shard, removed by the next run, which
then embeds exactly the files the killed one had not committed; the result equals an
uninterrupted build. faiss is exact (`IndexFlatIP`) up to `exact_limit` images, HNSW above.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from vlp.apps.ability import require
from vlp.apps.inputs import folder_images
from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.formats import IMAGE_EXTENSIONS, load_image
from vlp.data.sample import DataError
from vlp.data.transforms import eval_transform, model_images
from vlp.eval.encode import embed_texts, itm_pair_scores, tokenize_texts
from vlp.models.recipe import Recipe
from vlp.train.precision import resolve_precision

SCHEMA = """CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, mtime REAL, sha256 TEXT,
    shard INTEGER NOT NULL, row INTEGER NOT NULL)"""
HNSW_NEIGHBOURS, RECALL_QUERIES, TARGET_RECALL = 32, 1000, 0.95
HNSW_SEARCH_DEPTHS = (64, 128, 256, 512, 1024)  # efSearch tried in turn; the index keeps the last


def image_files(paths: Iterable[Path]) -> list[Path]:
    """The image files of `paths` (files, folders walked recursively), absolute, sorted."""
    found = set()
    for path in map(Path, paths):
        if path.is_dir():
            found.update(file.resolve() for file in folder_images(path))
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
            found.add(path.resolve())
    return sorted(found)


class _Files(Dataset):
    """File i -> (i, eval-transformed image, sha256) or (i, None, reason); decoded in workers."""

    def __init__(self, files: list[Path], image_size: int, max_pixels: int):
        self.files, self.transform, self.max_pixels = files, eval_transform(image_size), max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_image(self.files[i], self.max_pixels)
        except DataError as err:
            return i, None, str(err)
        return i, self.transform(image), hashlib.sha256(self.files[i].read_bytes()).hexdigest()


def _collate(items: list) -> list:
    return items


def build(
    model: Recipe,
    paths: Iterable[Path],
    out: Path,
    model_source: str = "",
    batch_size: int = 64,
    workers: int = 2,
    exact_limit: int = 100_000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Build or update the index `out` of the images under `paths`; returns its info.json,
    with the files skipped this run ("skipped": ["path: reason", ...]). `precision`: fp32, bf16
    autocast, or auto (bf16 where its matmuls are measured faster, `vlp.train.precision`); an
    index keeps the precision it was first built with, so that its embeddings stay comparable."""
    require(model, "search")
    out = Path(out)
    (out / "embeddings").mkdir(parents=True, exist_ok=True)
    info_path, previous = out / "info.json", {}
    if info_path.is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("model") != model_source:
            raise DataError(
                f"{out}: built with model {previous.get('model')!r}, not {model_source!r}; use a fresh --out"
            )
        precision = previous.get("precision", precision)
    precision = resolve_precision(precision, next(model.parameters()).device)
    db = sqlite3.connect(out / "meta.sqlite")
    db.execute(SCHEMA)
    files = image_files(paths)
    todo = _sync(db, files)
    _remove_orphan_shards(db, out)
    skipped = _embed(model, db, out, todo, batch_size, workers, max_pixels, progress, precision)
    info = _write_faiss(db, out, exact_limit)
    info.update(model=model_source, recipe=model.recipe, precision=precision, skipped=skipped)
    tmp = out / ".info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, info_path)
    db.close()
    return info


def _sync(db: sqlite3.Connection, files: list[Path]) -> list[Path]:
    """Drop rows of files gone or changed; return the files to embed (new or changed)."""
    stats = {str(f): _size_and_mtime(f) for f in files}
    known = {path: (size, mtime) for path, size, mtime in db.execute("SELECT path, size, mtime FROM images")}
    stale = [path for path, stat in known.items() if stats.get(path) != stat]
    with db:
        db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in stale])
    kept = set(known) - set(stale)
    return [f for f in files if str(f) not in kept]


def _size_and_mtime(path: Path) -> tuple[int, float]:
    """What tells a changed file from an unchanged one (one stat call)."""
    stat = path.stat()
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


def _embed(
    model: Recipe,
    db: sqlite3.Connection,
    out: Path,
    files: list[Path],
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress: Callable[[int], None] | None,
    precision: str,
) -> list[str]:
    """Embed `files` batch by batch, each batch's shard written before its rows are committed."""
    loader = DataLoader(
        _Files(files, model.image_size(), max_pixels), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    device, skipped = next(model.parameters()).device, []
    (last,) = db.execute("SELECT COALESCE(MAX(shard), 0) FROM images").fetchone()
    for shard, batch in enumerate(loader, start=last + 1):
        good = [(i, image, digest) for i, image, digest in batch if image is not None]
        skipped += [reason for _, image, reason in batch if image is None]
        if good:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.no_grad(), autocast:
                emb = model.encode_image(torch.stack([image for _, image, _ in good]).to(device)).float().cpu()
            if emb.dim() != 2:
                raise TypeError(
                    f"recipe {model.recipe!r} gives {emb.dim() - 1}-d image embeddings; an index "
                    "needs one vector per image"
                )
            path = out / "embeddings" / f"{shard:06d}.safetensors"
            save_file({"embeddings": emb.contiguous()}, str(path.with_suffix(".tmp")))
            os.replace(path.with_suffix(".tmp"), path)
            rows = [
                (str(files[i]), *_size_and_mtime(files[i]), digest, shard, row)
                for row, (i, _, digest) in enumerate(good)
            ]
            with db:
                db.executemany(
                    "INSERT INTO images (path, size, mtime, sha256, shard, row) VALUES (?, ?, ?, ?, ?, ?)", rows
                )
        if progress:
            progress(len(batch))
    return skipped


def _vectors(db: sqlite3.Connection, out: Path) -> tuple[list[str], np.ndarray]:
    """Every row's path and embedding, in row id order."""
    rows = db.execute("SELECT path, shard, row FROM images ORDER BY id").fetchall()
    shards = {
        shard: load_file(str(out / "embeddings" / f"{shard:06d}.safetensors"))["embeddings"]
        for shard in {shard for _, shard, _ in rows}
    }
    vectors = [shards[shard][row] for _, shard, row in rows]
    matrix = torch.stack(vectors).numpy() if vectors else np.zeros((0, 0), dtype=np.float32)
    return [path for path, _, _ in rows], np.ascontiguousarray(matrix, dtype=np.float32)


def faiss_index(vectors: np.ndarray, exact_limit: int) -> tuple[faiss.Index, dict[str, Any]]:
    """Exact inner-product search up to `exact_limit` vectors, HNSW above it, with HNSW's
    recall@10 against exact search measured on a seeded sample of the vectors as queries; its
    search depth (efSearch) is the smallest of HNSW_SEARCH_DEPTHS reaching TARGET_RECALL."""
    count, dim = vectors.shape
    if count <= exact_limit:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"kind": "exact", "count": count, "dimension": dim}
    index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    queries = vectors[random.Random(0).sample(range(count), min(RECALL_QUERIES, count))]
    k = min(10, count)
    truth = exact.search(queries, k)[1]
    for depth in HNSW_SEARCH_DEPTHS:  # the shallowest search that reaches the target recall
        index.hnsw.efSearch = depth
        found = index.search(queries, k)[1]
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
        if recall >= TARGET_RECALL:
            break
    info = {"kind": "hnsw", "count": count, "dimension": dim, "recall_at_10": recall, "ef_search": depth}
    return index, info


def _write_faiss(db: sqlite3.Connection, out: Path, exact_limit: int) -> dict[str, Any]:
    paths, vectors = _vectors(db, out)
    if not paths:
        raise DataError(f"{out}: no image could be indexed")
    index, info = faiss_index(vectors, exact_limit)
    faiss.write_index(index, str(out / ".index.faiss.tmp"))
    os.replace(out / ".index.faiss.tmp", out / "index.faiss")
    return info


class Index:
    """An index built by `build`, searched by text or by image (`Index.open(path).search(...)`)."""

    def __init__(self, path: Path, model: Recipe):
        self.path, self.model = Path(path), model
        self.info = json.loads((self.path / "info.json").read_text())
        self.faiss = faiss.read_index(str(self.path / "index.faiss"))
        with sqlite3.connect(self.path / "meta.sqlite") as db:
            self.paths = [path for (path,) in db.execute("SELECT path FROM images ORDER BY id")]

    @classmethod
    def open(cls, path: str | Path, model: Recipe | None = None) -> Index:
        """The index at `path`, with the model it was built with (loaded from info.json's
        "model" unless given)."""
        if model is None:
            from vlp.api import load

            model = load(json.loads((Path(path) / "info.json").read_text())["model"])
        return cls(Path(path), model)

    @torch.no_grad()
    def search(
        self, query: str | Image.Image, k: int = 10, rerank: str | None = None, shortlist: int = 50
    ) -> list[dict[str, Any]]:
        """The `k` best images for a text or an image: [{"path", "score"}], best first. With
        `rerank="itm"` (text queries, recipes with ITM), the `shortlist` best by embedding
        similarity are re-scored by the ITM head (BLIP Sec. 4, retrieval)."""
        if isinstance(query, str):
            vector = embed_texts(self.model, [query])
        else:
            vector = self.model.encode_image(model_images(self.model, [query])).cpu()
        depth = min(max(k, shortlist if rerank else k), len(self.paths))
        scores, ids = self.faiss.search(np.ascontiguousarray(vector.float().numpy()), depth)
        hits = [{"path": self.paths[i], "score": float(s)} for s, i in zip(scores[0], ids[0]) if i >= 0]
        if rerank is not None:
            hits = self._itm_reranked(query, hits)
        return hits[:k]

    def _itm_reranked(self, query: str | Image.Image, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(query, str) or not self.model.has_itm():
            raise TypeError(
                f"--rerank itm needs a text query and a recipe with a trained ITM head, not {self.model.recipe!r}"
            )
        tokens = tokenize_texts(self.model, [query] * len(hits))
        images = [load_image(hit["path"]) for hit in hits]
        scores = itm_pair_scores(
            self.model, images, tokens["input_ids"], tokens["attention_mask"], torch.arange(len(hits))
        )
        ranked = sorted(zip(scores.tolist(), hits), key=lambda pair: -pair[0])
        return [{**hit, "score": score} for score, hit in ranked]
