"""Readers for image-caption data in the formats people actually have.

Every reader returns a `CaptionDataset`: a map-style dataset of lazily decoded images with their
captions and metadata. Supported formats:

- webdataset tar shards (`read_webdataset`; `write_webdataset` writes them)
- JSON lines, one object per image (`read_jsonl`)
- open_clip style CSV/TSV, one row per caption (`read_csv`)
- COCO captions in Karpathy's or BLIP/LAVIS's JSON layout (`read_coco_karpathy`)
- a folder of class subfolders, for classification (`read_image_folder`)
- VQAv2's questions and annotations JSON with COCO's images, for VQA (`read_vqav2`)

`open_dataset` picks the right reader for a path.

Problems are found at two moments. While reading the listing (a malformed line, a missing field,
an empty caption, a row that is not UTF-8, a listed image that does not exist or lies outside
the data set) the entry is left out and recorded in `dataset.skipped`. While decoding (bytes
Pillow cannot read, whatever it raises; a file that vanished; an image over the pixel cap)
`dataset[i]` returns a `Skipped` record instead of a `Sample`. With `strict=True` both raise
`DataError`. Every `Skipped.reason` reads "<kind>: <detail>" (e.g. "empty caption: field
'caption'"), so `format_skips` can count skips by kind. Only a file that cannot be read at all (a
JSON document that does not parse, a CSV header without the needed columns, no shards) raises
`DataError` in every mode.

Listings are untrusted input. Every listed image must resolve, symlinks followed, inside a root
folder: by default the listing's own folder (COCO: `image_root`, default the JSON's folder; image
folders: the folder itself). Passing `image_root` (any absolute folder, even "/") is how a user
allows images elsewhere; other paths are skipped as "path outside data set". Images are decoded
only if width x height <= `max_pixels` (`DEFAULT_MAX_PIXELS`), checked from the header before any
pixel is decoded, so a small file cannot expand to gigabytes (a "pixel bomb"). Decoding applies
the EXIF orientation (phone photos), so what the model sees is what a viewer shows.

Labels, for classification, are read in every format that can carry one: image folders (the
folder), webdataset `<key>.cls` members or a "label" in the `.json` member (CLIP_benchmark's
layout), and a `label_key` column or field of CSV and JSONL. A labelled item needs no caption.
Its metadata holds "label" (a class name) and/or "label_id" (an integer id); `class_labels`
resolves both against the class list, which comes from a CLIP_benchmark `classnames.txt` beside
the data (`dataset.classes_file`), else from the class folders or the sorted label names.
`dataset.templates` holds the prompts of a `zeroshot_classification_templates.txt` found there.
"""

from __future__ import annotations

import copy
import csv
import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from vlp.config import DEFAULT_MAX_PIXELS
from vlp.data.sample import DataError, Sample, Skipped

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PathLike = str | os.PathLike
_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")
_SURROGATES = re.compile("[\ud800-\udfff]")  # in str from bytes that were not UTF-8
CLASS_NAMES_FILE = "classnames.txt"  # CLIP_benchmark: line i is the name of class id i
WEBDATASET_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark: "{c}" marks the name


@dataclass(slots=True)
class _Entry:
    """One listed image: a file path, or raw bytes (tars), with its captions and metadata."""

    image: str | bytes
    captions: list[str]
    meta: dict[str, Any]
    source: str  # image path or shard#key


class _Bad(Exception):
    """An index-time problem with one entry; the reader turns it into a Skipped or a DataError."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")


class CaptionDataset(Dataset):
    """Images with captions and metadata, addressable by index; images decode on access.

    Built by the `read_*` functions. `captions(i)` and `meta(i)` never decode an image; images
    over `max_pixels` pixels are skipped without being decoded.
    """

    def __init__(
        self,
        entries: list[_Entry],
        source: str,
        skipped: list[Skipped],
        strict: bool = False,
        classes: list[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.entries = entries
        self.source = source
        self.skipped = skipped
        self.strict = strict
        self.classes = classes or []
        self.classes_file: str | None = None  # the classnames.txt `classes` was read from
        self.templates: list[str] = []  # prompt templates ("{}" placeholder) found beside the data
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Sample | Skipped:
        entry = self.entries[i]
        try:
            image = _decode(entry.image, self.max_pixels)
        except _Bad as bad:
            return self._decode_failure(entry.source, str(bad))
        return Sample(image, list(entry.captions), copy.deepcopy(entry.meta), entry.source)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of item i: its file's bytes, or the tar member's."""
        image = self.entries[i].image
        return image if isinstance(image, bytes) else Path(image).read_bytes()

    def image_file(self, i: int) -> str:
        """The file holding item i's image: the image file, or the tar shard it is a member of
        (its source is "shard#key")."""
        entry = self.entries[i]
        return entry.image if isinstance(entry.image, str) else entry.source.rsplit("#", 1)[0]

    def captions(self, i: int) -> list[str]:
        """The captions of item i, without decoding its image."""
        return list(self.entries[i].captions)

    def meta(self, i: int) -> dict[str, Any]:
        """The metadata of item i, without decoding its image."""
        return copy.deepcopy(self.entries[i].meta)

    def __repr__(self) -> str:
        return f"CaptionDataset({self.source!r}, {len(self)} items, {len(self.skipped)} skipped)"

    def _decode_failure(self, source: str, reason: str) -> Skipped:
        if self.strict:
            raise DataError(f"{source}: {reason}")
        return Skipped(source, reason)


def _decode(image: str | bytes, max_pixels: int) -> Image.Image:
    """An image file or bytes as RGB, EXIF orientation applied; _Bad if it cannot be.

    The pixel cap is checked on the header, before decoding. The bytes are untrusted: Pillow's
    many format plugins raise many exception types on malformed input (a DDS file renamed .png
    raises NotImplementedError), so any exception is a corrupt image, not a crash.
    """
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            if img.width * img.height > max_pixels:
                size = f"{img.width}x{img.height} pixels, cap {max_pixels} (data.max_pixels)"
                raise _Bad("image too large", size)
            ImageOps.exif_transpose(img, in_place=True)
            return img.convert("RGB")
    except _Bad:
        raise
    except FileNotFoundError:
        raise _Bad("missing image", "no such file") from None
    except Image.DecompressionBombError as exc:  # over Pillow's own limit, above any cap we allow
        raise _Bad("image too large", str(exc)) from None
    except Exception as exc:
        raise _Bad("corrupt image", f"{type(exc).__name__}: {exc}") from None


def load_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """One image file as RGB, decoded exactly as the readers decode their images (EXIF
    orientation applied, `max_pixels` cap); DataError "path: reason" if it cannot be."""
    try:
        return _decode(str(path), max_pixels)
    except _Bad as bad:
        raise DataError(f"{path}: {bad}") from None


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes as RGB, decoded as `load_image` decodes a file; DataError
    "source: reason" if they cannot be."""
    try:
        return _decode(data, max_pixels)
    except _Bad as bad:  # Pillow names the buffer it read from: name the source instead
        raise DataError(f"{source}: {_BUFFER.sub(repr(source), str(bad))}") from None


def read_tar_image(shard: PathLike, key: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image of the group `key` of a webdataset shard (what `read_webdataset` lists as
    "shard#key"), read without loading the rest of the shard's images."""
    with tarfile.open(shard) as tar:
        for member in tar:
            group, extension = _member_key(member.name)
            if member.isfile() and group == key and extension.lower() in WEBDATASET_IMAGE_KEYS:
                return decode_image(tar.extractfile(member).read(), f"{shard}#{key}", max_pixels)
    raise DataError(f"{shard}#{key}: no such image in the shard")


def _member_key(name: str) -> tuple[str, str]:
    """A tar member's group key (its path up to the first dot of its basename) and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


class _Listing:
    """Collects entries while a reader walks a listing; handles problems per strict mode."""

    def __init__(self, strict: bool, max_pixels: int):
        self.strict, self.max_pixels = strict, max_pixels
        self.entries: list[_Entry] = []
        self.skipped: list[Skipped] = []

    def add(self, where: str, make: Callable[..., _Entry], *args: Any) -> None:
        """Append make(*args); if that raises _Bad, record a skip at `where` instead."""
        try:
            self.entries.append(make(*args))
        except _Bad as bad:
            self.skip(where, str(bad))

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        self.skipped.append(Skipped(where, reason))

    def dataset(self, source: PathLike, classes: list[str] | None = None) -> CaptionDataset:
        return CaptionDataset(self.entries, str(source), self.skipped, self.strict, classes, self.max_pixels)


def _clean_captions(value: Any, field: str, allow_empty: bool = False) -> list[str]:
    """A caption or list of captions, stripped, empty ones dropped; _Bad if none is left
    (unless `allow_empty`: a labelled item needs no caption)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _Bad("bad field", f"{field!r} must be a string or a list of strings")
    if any(_SURROGATES.search(c) for c in value):
        raise _Bad("bad field", f"{field!r} is not valid Unicode (a lone surrogate)")
    captions = [c.strip() for c in value if c.strip()]
    if not captions and not allow_empty:
        raise _Bad("empty caption", f"field {field!r} has no non-empty caption")
    return captions


def _label_meta(value: Any, field: str) -> dict[str, Any]:
    """A listed label as metadata: {"label_id": id} for an integer or a string of ASCII digits
    (CSV cells and `.cls` members are text), else {"label": class name}; _Bad otherwise."""
    if isinstance(value, str):
        value = value.strip()
        if re.fullmatch("[0-9]+", value):
            value = int(value) if len(value) <= 18 else -1  # int() refuses over 4300 digits
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Bad("bad label", f"{field!r} must be an id >= 0 with at most 18 digits")
        return {"label_id": value}
    if not isinstance(value, str) or not value or _SURROGATES.search(value):
        raise _Bad("bad label", f"{field!r} must be a class name or an integer class id")
    return {"label": value}


def _image_path(base: Path, value: Any, field: str, root: Path) -> str:
    """Resolve a listed image path against `base`; _Bad if it is not a string, lies outside
    `root` (a real path, see `_real`) or is not a file."""
    if not isinstance(value, str) or not value:
        raise _Bad("bad field", f"{field!r} must be a non-empty path")
    path = base / value  # an absolute value replaces base
    _confine(path, root)
    if not path.is_file():
        raise _Bad("missing image", str(path))
    return str(path)


def _real(folder: PathLike) -> Path:
    """The root that listed images must lie in, as a real path (symlinks resolved)."""
    return Path(os.path.realpath(folder))


def _confine(path: Path, root: Path) -> None:
    """_Bad unless `path`, symlinks followed, lies inside `root` (from `_real`): a listing must
    not reach files elsewhere on the machine through `../`, an absolute path or a symlink."""
    try:
        inside = Path(os.path.realpath(path)).is_relative_to(root)
    except ValueError:  # a NUL byte or a lone surrogate: no file has this name
        raise _Bad("bad field", f"unusable path {str(path)!r}") from None
    if not inside:
        detail = f"{path} is not inside {root}; set image_root (data.image_root) to allow it"
        raise _Bad("path outside data set", detail)


def _require(record: dict[str, Any], field: str) -> Any:
    if field not in record:
        raise _Bad("missing field", repr(field))
    return record[field]


# ---------------------------------------------------------------------------------------------
# webdataset tar shards


def read_webdataset(
    urls: PathLike | list[PathLike],
    strict: bool = False,
    image_keys: tuple[str, ...] = WEBDATASET_IMAGE_KEYS,
    text_keys: tuple[str, ...] = ("json", "txt"),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label_keys: tuple[str, ...] = ("cls",),
) -> CaptionDataset:
    """Read webdataset tar shards: a directory of .tar files, a glob, a brace pattern
    (`shard-{000000..000003}.tar`), a single path, or a list of any of these.

    Members are grouped by key (the member path up to the first dot of its basename). A "json"
    member holds {"caption": str | [str], ...meta}; a "txt" member holds one caption. The first
    of `image_keys` / `text_keys` present in a group is used. A label comes from a `label_keys`
    member (CLIP_benchmark's `<key>.cls`: the class id as text) or else a "label" in the json
    member; a labelled item needs no caption. `classnames.txt` and the templates file are looked
    for in the first shard's folder, then its parent (CLIP_benchmark: `root/classnames.txt`
    beside `root/test/0.tar`).

    All image bytes are held in memory, so this is meant for data sets that fit in RAM (up to a
    few GB of images); stream larger ones with the `webdataset` library instead.
    """
    shards = _resolve_shards(urls)
    listing = _Listing(strict, max_pixels)
    wanted = set(image_keys) | set(text_keys) | set(label_keys)
    for shard in shards:
        for key, members in _read_tar(shard, wanted, listing).items():
            where = f"{shard}#{key}"
            listing.add(where, _tar_entry, members, where, image_keys, text_keys, label_keys)
    source = urls if isinstance(urls, (str, os.PathLike)) else ", ".join(map(str, urls))
    return _with_class_files(listing.dataset(source), Path(shards[0]).parent)


def write_webdataset(
    directory: Path, prefix: str, samples: Iterable[tuple[str, bytes, dict[str, Any]]], shard_size: int = 5000
) -> None:
    """Write (key, PNG bytes, metadata) samples as `directory/prefix-000000.tar`, ... shards of
    `shard_size` samples, the layout `read_webdataset` reads back: members `<key>.png` and
    `<key>.json` (the metadata, its "caption" field included)."""
    import webdataset as wds  # imported here: only writing shards needs it

    directory.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(directory / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for key, png, meta in samples:
            sink.write({"__key__": key, "png": png, "json": json.dumps(meta).encode()})


def _resolve_shards(urls: PathLike | list[PathLike]) -> list[str]:
    """Expand a directory, glob, brace pattern or list into existing shard paths."""
    if not isinstance(urls, (str, os.PathLike)):
        return [shard for url in urls for shard in _resolve_shards(url)]
    url = str(urls)
    if os.path.isdir(url):
        shards = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
    elif any(c in url for c in "*?["):
        shards = sorted(glob.glob(url))
    else:
        shards = list(braceexpand.braceexpand(url))
    if not shards:
        raise DataError(f"{url}: no .tar shards found")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{url}: shard not found: {missing[0]}")
    return shards


def _read_tar(shard: str, wanted: set[str], listing: _Listing) -> dict[str, dict[str, bytes]]:
    """Members of one shard grouped by key: {key: {extension: bytes}} (wanted extensions only).

    A shard that cannot be read (truncated, not a tar, any exception of `tarfile` on malformed
    bytes) is recorded as a skip; the groups read before the failure are kept.
    """
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = _member_key(member.name)
                group = groups.setdefault(key, {})
                if extension.lower() in wanted:
                    group[extension.lower()] = tar.extractfile(member).read()
    except Exception as exc:  # untrusted bytes: tarfile raises more than TarError
        listing.skip(shard, f"corrupt shard: {type(exc).__name__}: {exc}")
    return groups


def _tar_entry(
    members: dict[str, bytes],
    source: str,
    image_keys: Iterable[str],
    text_keys: Iterable[str],
    label_keys: Iterable[str] = (),
) -> _Entry:
    image_key = next((k for k in image_keys if k in members), None)
    if image_key is None:
        raise _Bad("missing image", f"no member with extension {'/'.join(image_keys)}")
    text_key = next((k for k in text_keys if k in members), None)
    label_key = next((k for k in label_keys if k in members), None)
    if text_key is None and label_key is None:
        raise _Bad("missing field", f"no {'/'.join([*text_keys, *label_keys])} member")
    record = _tar_record(members, text_key) if text_key else {}
    if label_key is not None:
        label = _label_meta(_tar_text(members, label_key), f".{label_key}")
    else:
        label = _label_meta(record["label"], "label") if record.get("label") is not None else {}
    caption = record.get("caption", []) if label else _require(record, "caption")
    captions = _clean_captions(caption, "caption", allow_empty=bool(label))
    meta = {k: v for k, v in record.items() if k not in ("caption", "label")} | label
    return _Entry(members[image_key], captions, meta, source)


def _tar_text(members: dict[str, bytes], key: str) -> str:
    try:
        return members[key].decode("utf-8")
    except ValueError as exc:
        raise _Bad("malformed member", f".{key}: {exc}") from None


def _tar_record(members: dict[str, bytes], text_key: str) -> dict[str, Any]:
    """The json member as a dict, or a txt member as {"caption": text}."""
    text = _tar_text(members, text_key)
    try:
        record = json.loads(text) if text_key == "json" else {"caption": text}
    except (ValueError, RecursionError) as exc:  # bad JSON, absurd nesting
        raise _Bad("malformed member", f".{text_key}: {exc}") from None
    if not isinstance(record, dict):
        raise _Bad("malformed member", f".{text_key}: expected a JSON object")
    return record


# ---------------------------------------------------------------------------------------------
# JSON lines


def read_jsonl(
    path: PathLike,
    strict: bool = False,
    image_key: str = "image",
    caption_key: str = "caption",
    image_root: PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label_key: str | None = None,
) -> CaptionDataset:
    """Read one JSON object per line: {"image": path, "caption": str | [str], ...meta}.

    Image paths are relative to the JSONL file's directory (absolute paths are kept) and must lie
    inside `image_root` (default: that directory). All other fields become the item's metadata.
    Blank lines are ignored. With `label_key`, every line needs that field (a class name or an
    integer id) and the caption becomes optional; `classnames.txt` and the templates file are
    looked for in the file's folder, then its parent.
    """
    path = Path(path)
    root = _real(path.parent if image_root is None else image_root)
    listing = _Listing(strict, max_pixels)
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}:{line_number}"
                listing.add(where, _jsonl_entry, line, path.parent, image_key, caption_key, root, label_key)
    return _with_class_files(listing.dataset(path), path.parent)


def _jsonl_entry(
    line: bytes, base: Path, image_key: str, caption_key: str, root: Path, label_key: str | None
) -> _Entry:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise _Bad("malformed line", str(exc)) from None
    if not isinstance(record, dict):
        raise _Bad("malformed line", f"expected a JSON object, got {type(record).__name__}")
    return _record_entry(record, base, image_key, caption_key, root, label_key)


def _record_entry(
    record: dict[str, Any], base: Path, image_key: str, caption_key: str, root: Path, label_key: str | None = None
) -> _Entry:
    """An entry from a {image_key: path, caption_key: str | [str], ...meta} record; with
    `label_key`, a {image_key, label_key, [caption_key], ...meta} record."""
    label = _label_meta(_require(record, label_key), label_key) if label_key else {}
    caption = record.get(caption_key, []) if label else _require(record, caption_key)
    captions = _clean_captions(caption, caption_key, allow_empty=bool(label))
    image = _image_path(base, _require(record, image_key), image_key, root)
    meta = {k: v for k, v in record.items() if k not in (image_key, caption_key, label_key)} | label
    return _Entry(image, captions, meta, image)


# ---------------------------------------------------------------------------------------------
# CSV / TSV (open_clip style)


def read_csv(
    path: PathLike,
    strict: bool = False,
    image_key: str = "filepath",
    caption_key: str = "title",
    sep: str | None = None,
    image_root: PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label_key: str | None = None,
) -> CaptionDataset:
    """Read an open_clip style CSV/TSV with a header row, one row per caption.

    `sep` defaults to a tab for .tsv files and for .csv files whose header contains a tab, else
    a comma. Rows with the same image path become one item with several captions (file order).
    Image paths are relative to the file's directory and must lie inside `image_root` (default:
    that directory). Other columns of an image's first row become its metadata. A row with bytes
    that are not UTF-8 is skipped. A missing column, or a header that is not UTF-8, always
    raises DataError: the file is unusable. With `label_key`, that column is needed (a class
    name or an integer id per row; an image's first row gives its label), the caption column
    becomes optional and a row with an empty caption keeps its label; `classnames.txt` and the
    templates file are looked for in the file's folder, then its parent.
    """
    path = Path(path)
    root = _real(path.parent if image_root is None else image_root)
    # surrogateescape: a bad byte becomes a lone surrogate, found per row (not failing the file)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        header = f.readline()
        if _SURROGATES.search(header):
            raise DataError(f"{path}:1: header is not UTF-8")
        if sep is None:
            sep = "\t" if path.suffix.lower() == ".tsv" or "\t" in header else ","
        columns = next(csv.reader([header], delimiter=sep), [])
        for column in (image_key, label_key) if label_key else (image_key, caption_key):
            if column not in columns:
                found = ", ".join(columns) or "nothing"
                raise DataError(f"{path}:1: missing column {column!r} (header has {found})")
        listing = _Listing(strict, max_pixels)
        groups = _group_csv_rows(path, f, sep, columns, (image_key, caption_key, label_key), listing)
    for image, (where, captions, meta) in groups.items():
        listing.add(where, _csv_entry, path.parent, image, captions, meta, image_key, root)
    return _with_class_files(listing.dataset(path), path.parent)


def _group_csv_rows(
    path: Path,
    f: Iterable[str],
    sep: str,
    columns: list[str],
    keys: tuple[str, str, str | None],
    listing: _Listing,
) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """Rows grouped by image: {image: (where it is first listed, captions, first row's meta)};
    `keys` are the image, caption and label columns."""
    groups: dict[str, tuple[str, list[str], dict[str, Any]]] = {}
    rows = csv.reader(f, delimiter=sep)
    try:
        for values in rows:
            where = f"{path}:{rows.line_num + 1}"  # +1: the header was read before
            if not values:
                continue
            try:
                image, caption, meta = _csv_row(values, columns, *keys)
            except _Bad as bad:
                listing.skip(where, str(bad))
                continue
            captions = groups.setdefault(image, (where, [], meta))[1]
            captions += [caption] if caption else []  # only a labelled row may have none
    except csv.Error as exc:
        raise DataError(f"{path}:{rows.line_num + 1}: unreadable row: {exc}") from None
    return groups


def _csv_row(
    values: list[str], columns: list[str], image_key: str, caption_key: str, label_key: str | None = None
) -> tuple[str, str, dict[str, Any]]:
    """(image, caption, other columns) of one row; _Bad if the row is malformed or empty (with
    `label_key`: if its label is; the caption may then be empty or its column absent)."""
    if any(_SURROGATES.search(v) for v in values):
        raise _Bad("malformed row", "not UTF-8")
    if len(values) != len(columns):
        raise _Bad("malformed row", f"{len(values)} fields, the header has {len(columns)}")
    row = dict(zip(columns, values))
    label = _label_meta(row[label_key], label_key) if label_key else {}
    caption = row.get(caption_key, "").strip()
    if not caption and not label:
        raise _Bad("empty caption", f"column {caption_key!r}")
    if not row[image_key]:
        raise _Bad("bad field", f"column {image_key!r} is empty")
    meta = {k: v for k, v in row.items() if k not in (image_key, caption_key, label_key)} | label
    return row[image_key], caption, meta


def _csv_entry(base: Path, image: str, captions: list[str], meta: dict[str, Any], image_key: str, root: Path) -> _Entry:
    path = _image_path(base, image, image_key, root)
    return _Entry(path, captions, meta, path)


# ---------------------------------------------------------------------------------------------
# COCO captions (Karpathy split file, or BLIP/LAVIS annotation list)

# Karpathy's "restval" images (val2014 images outside his val/test) count as training data.
KARPATHY_SPLITS = {
    "train": ("train", "restval"),
    "restval": ("restval",),
    "val": ("val",),
    "test": ("test",),
}


def read_coco_karpathy(
    path: PathLike,
    split: str = "test",
    image_root: PathLike | None = None,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> CaptionDataset:
    """Read COCO-style captions in either common JSON layout.

    (a) Karpathy's `dataset_coco.json`: {"images": [{"filepath", "filename", "split",
        "sentences": [{"raw": ...}], "cocoid"/"imgid"}]}; split "train" includes "restval".
    (b) BLIP/LAVIS annotations: [{"image": "val2014/x.jpg", "caption": str | [str],
        "image_id": ...}]; the file is already one split, so `split` is ignored.

    Image paths are relative to `image_root` (default: the JSON file's directory) and must lie
    inside it. Ids go into the metadata; both layouts set meta["image_id"].
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    listing, allowed = _Listing(strict, max_pixels), _real(root)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        _read_karpathy_images(path, data["images"], split, root, allowed, listing)
    elif isinstance(data, list):
        for i, record in enumerate(data):
            listing.add(f"{path}:[{i}]", _lavis_entry, record, root, allowed)
    else:
        raise DataError(f"{path}: expected Karpathy's {{'images': [...]}} or a list of {{'image', 'caption'}} records")
    return listing.dataset(path)


def _read_karpathy_images(
    path: Path, images: list[Any], split: str, root: Path, allowed: Path, listing: _Listing
) -> None:
    if split not in KARPATHY_SPLITS:
        expected = ", ".join(KARPATHY_SPLITS)
        raise DataError(f"{path}: unknown split {split!r}; expected one of {expected}")
    for i, record in enumerate(images):
        if isinstance(record, dict) and record.get("split") in KARPATHY_SPLITS[split]:
            listing.add(f"{path}:images[{i}]", _karpathy_entry, record, root, allowed)
    if not listing.entries and not listing.skipped:
        found = sorted({str(r.get("split")) for r in images if isinstance(r, dict)})
        present = ", ".join(found)
        raise DataError(f"{path}: no images in split {split!r} (splits present: {present})")


def _karpathy_entry(record: dict[str, Any], root: Path, allowed: Path) -> _Entry:
    sentences = _require(record, "sentences")
    if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
        raise _Bad("bad field", "'sentences' must be a list of {'raw': caption}")
    captions = _clean_captions([s["raw"] for s in sentences], "sentences")
    folder = root / str(record.get("filepath", ""))
    image = _image_path(folder, _require(record, "filename"), "filename", allowed)
    meta = {k: record[k] for k in ("cocoid", "imgid", "sentids", "split") if k in record}
    meta["image_id"] = record.get("cocoid", record.get("imgid"))
    return _Entry(image, captions, meta, image)


def _lavis_entry(record: Any, root: Path, allowed: Path) -> _Entry:
    if not isinstance(record, dict):
        raise _Bad("malformed record", f"expected a JSON object, got {type(record).__name__}")
    return _record_entry(record, root, "image", "caption", allowed)


# ---------------------------------------------------------------------------------------------
# image folder (classification)


def read_image_folder(
    root: PathLike,
    strict: bool = False,
    image_root: PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> CaptionDataset:
    """Read `root/<class_name>/<image files>` (nested folders allowed) for classification.

    Items have no captions and meta {"label": class_name, "label_id": int}, classes sorted by
    name (`dataset.classes`). Files without an image extension are recorded as skipped; hidden
    files are ignored. Files must resolve inside `image_root` (default: `root`), so a symlink
    to elsewhere is skipped unless `image_root` allows it. A class folder without any image file
    is recorded as skipped ("empty class"; DataError when strict) and keeps its id, so ids agree
    across splits. A `classnames.txt` in `root` or its parent replaces the folder names in
    `dataset.classes` (ImageNet's folders are WordNet ids; line i names the i-th folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders found")
    allowed = _real(root if image_root is None else image_root)
    listing = _Listing(strict, max_pixels)
    for label_id, label in enumerate(classes):
        files = [p for p in sorted((root / label).rglob("*")) if p.is_file() and not p.name.startswith(".")]
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            listing.skip(str(root / label), f"empty class: no image file in class folder {label!r} (id {label_id})")
        for path in files:
            listing.add(str(path), _folder_entry, path, label, label_id, allowed)
    return _with_class_files(listing.dataset(root, classes), root)


def _folder_entry(path: Path, label: str, label_id: int, root: Path) -> _Entry:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise _Bad("not an image", f"extension {path.suffix or '(none)'!r}")
    _confine(path, root)
    return _Entry(str(path), [], {"label": label, "label_id": label_id}, str(path))


def _is_image_folder(path: Path) -> bool:
    """Whether `path` has a subfolder with at least one image file in it."""
    return path.is_dir() and any(
        sub.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in sub.iterdir()) for sub in path.iterdir()
    )


# ---------------------------------------------------------------------------------------------
# class names and prompt templates (classification, CLIP_benchmark's files)


def read_class_names(path: PathLike) -> list[str]:
    """A `classnames.txt`: one class name per line, line i naming class id i. Names are
    stripped and trailing blank lines ignored; a blank line before the last name (it would shift
    every later id) or bytes that are not UTF-8 are a DataError naming the line. A name may
    repeat (ids, not names, define the classes).
    """
    lines = _text_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if "" in names:
        raise DataError(f"{path}:{names.index('') + 1}: blank line; line i must name class id i")
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def read_templates(path: PathLike) -> list[str]:
    """A `zeroshot_classification_templates.txt`: one prompt template per line, blank lines
    ignored, as vlp templates (`template.format(name)`). CLIP_benchmark's `{c}` placeholder
    becomes `{}` (other braces in such a line are literal); a line without `{c}` must already
    be a vlp template with one `{}`. A line with neither is a DataError naming the line.
    """
    templates = []
    for number, line in enumerate(_text_lines(path), start=1):
        line = line.strip()
        if not line:
            continue
        if "{c}" in line:  # "{0}" where the name appears twice
            placeholder = "{}" if line.count("{c}") == 1 else "{0}"
            line = placeholder.join(part.replace("{", "{{").replace("}", "}}") for part in line.split("{c}"))
        try:
            marked = "\0" in line.format("\0")
        except (IndexError, KeyError, ValueError):
            marked = False
        if not marked:
            raise DataError(f"{path}:{number}: template {line!r} has no {{c}} or {{}} placeholder for the class name")
        templates.append(line)
    if not templates:
        raise DataError(f"{path}: no templates")
    return templates


def _text_lines(path: PathLike) -> list[str]:
    try:
        return Path(path).read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8: {exc}") from None


def _with_class_files(dataset: CaptionDataset, folder: Path) -> CaptionDataset:
    """Attach the class names and templates found in `folder`, else its parent (CLIP_benchmark
    keeps them beside the split folders). Without a class-names file, labels that are all class
    names give the sorted distinct names, as class folders do."""
    for directory in (folder, folder.parent):
        if (directory / CLASS_NAMES_FILE).is_file():
            dataset.classes_file = str(directory / CLASS_NAMES_FILE)
            dataset.classes = read_class_names(dataset.classes_file)
            break
    else:
        metas = [entry.meta for entry in dataset.entries]
        if not dataset.classes and metas and all("label" in meta for meta in metas):
            dataset.classes = sorted({meta["label"] for meta in metas})
    for directory in (folder, folder.parent):
        if (directory / TEMPLATES_FILE).is_file():
            dataset.templates = read_templates(directory / TEMPLATES_FILE)
            break
    return dataset


def class_labels(dataset: CaptionDataset, class_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """(each item's class id, the class names) for zero-shot classification.

    The names are `class_names` if given, else `dataset.classes`. An item's class is its label
    name (meta "label") when the names hold it, else its id (meta "label_id", e.g. a `.cls`
    member or a class folder's position) when 0 <= id < len(names) and the item has no name, or no
    item's name is among the names (folders named by id, named in order). Any other label, or an item
    without one, is a DataError naming the label, the first item carrying it, how many items are
    affected and where the names came from: a class list that does not match the data (a wrong
    `classnames.txt`, a typo) would otherwise score a different task without a word.
    """
    names = list(class_names) if class_names is not None else dataset.classes
    origin = "the class_names given" if class_names is not None else dataset.classes_file
    origin = origin or f"the classes of {dataset.source}"
    if not names:
        raise DataError(f"{dataset.source}: no class names; put a {CLASS_NAMES_FILE} (line i names id i) beside it")
    index = {name: i for i, name in reversed(list(enumerate(names)))}  # a repeated name: its first id
    # Names match names; ids stand in for items without a name, and for all when no name matches
    # (class folders named by WordNet id, with a classnames.txt in folder order).
    by_name = any(entry.meta.get("label") in index for entry in dataset.entries)
    ids, unmatched = [], {}
    for entry in dataset.entries:
        label, label_id = entry.meta.get("label"), entry.meta.get("label_id")
        if isinstance(label, str) and label in index:
            ids.append(index[label])
        elif (label is None or not by_name) and isinstance(label_id, int) and 0 <= label_id < len(names):
            ids.append(label_id)
        else:
            what = repr(label) if label is not None else f"id {label_id}" if label_id is not None else None
            unmatched.setdefault(what, []).append(entry.source)
    if unmatched:
        what, sources = next(iter(unmatched.items()))
        problem = "no label" if what is None else f"label {what}, not in {origin} ({len(names)} classes)"
        count = f"{sum(len(s) for s in unmatched.values())} item(s), {len(unmatched)} distinct label(s)"
        raise DataError(f"{dataset.source}: {sources[0]} has {problem}; {count} do not match")
    return ids, names


# ---------------------------------------------------------------------------------------------
# VQAv2 (questions and annotations JSON, COCO images)

VQAV2_QUESTIONS = "v2_OpenEnded_mscoco_{split}_questions.json"
VQAV2_ANNOTATIONS = "v2_mscoco_{split}_annotations.json"
VQAV2_IMAGE_PATTERNS = ("COCO_{split}_{image_id:012d}.jpg", "{image_id}.jpg")  # COCO's names, else bare ids
VQAV2_DEFAULT_SPLIT = "val2014"
_VQAV2_SPLITS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}


def read_vqav2(
    path: PathLike,
    split: str = VQAV2_DEFAULT_SPLIT,
    image_root: PathLike | None = None,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_patterns: str | tuple[str, ...] = VQAV2_IMAGE_PATTERNS,
) -> CaptionDataset:
    """Read VQAv2 as downloaded: `path/v2_OpenEnded_mscoco_<split>_questions.json` and
    `path/v2_mscoco_<split>_annotations.json`, with COCO's images of the split.

    One item per image (in the order of the questions), without captions, with meta
    {"image_id", "qa": [{"question", "answer" (the annotation's "multiple_choice_answer"),
    "answers" (the ten annotators'), "type" (the answer type: "yes/no", "number", "other"),
    "question_type", "question_id"}]}. `split` is VQAv2's name ("val2014"; "train", "val",
    "test" and "test-dev" name the 2014/2015 splits). An image is the first of `image_patterns`
    (formatted with `split` and `image_id`) found in `image_root`, default `path/<split>` (COCO's
    folder) if that exists, else `path`; it must lie inside that folder.

    Scoring needs the annotators' answers, so the annotations file is required (DataError
    without it: the test splits' answers are held by the evaluation server). A question without
    an annotation is skipped as "missing annotation: question_id N", a malformed one as the
    other readers skip theirs; an image left with no question is not an item.
    """
    split, path = _VQAV2_SPLITS.get(split, split), Path(path)
    questions_path = path / VQAV2_QUESTIONS.format(split=split)
    annotations = _vqav2_annotations(path / VQAV2_ANNOTATIONS.format(split=split))
    if image_root is None:
        image_root = path / split if (path / split).is_dir() else path
    root, patterns = Path(image_root), _vqav2_patterns(image_patterns, split)
    listing, allowed = _Listing(strict, max_pixels), _real(root)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for i, record in enumerate(_vqav2_section(questions_path, "questions")):
        try:
            image_id, qa = _vqav2_qa(record, annotations)
        except _Bad as bad:
            listing.skip(f"{questions_path}:questions[{i}]", str(bad))
            continue
        by_image.setdefault(image_id, []).append(qa)
    for image_id, qa in by_image.items():
        listing.add(f"{questions_path}:image_id {image_id}", _vqav2_entry, image_id, qa, split, patterns, root, allowed)
    return listing.dataset(path)


def _vqav2_annotations(path: Path) -> dict[int, dict[str, Any]]:
    """The annotations by question id (records without an integer id are left out: their
    questions are then skipped as missing an annotation)."""
    if not path.is_file():
        raise DataError(
            f"{path}: not found; VQA accuracy needs the annotators' answers "
            "(a test split has none: its evaluation server holds them)"
        )
    records = _vqav2_section(path, "annotations")
    return {a["question_id"]: a for a in records if isinstance(a, dict) and isinstance(a.get("question_id"), int)}


def _vqav2_section(path: Path, key: str) -> list[Any]:
    """The list under `key` of a VQAv2 JSON file; DataError if the file cannot be used at all."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected VQAv2's {{{key!r}: [...]}}")
    return data[key]


def _vqav2_patterns(patterns: str | tuple[str, ...], split: str) -> tuple[str, ...]:
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for pattern in patterns:
        try:
            pattern.format(split=split, image_id=0)
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"image pattern {pattern!r}: {exc!r}; it may use {{split}} and {{image_id}}") from None
    return patterns


def _vqav2_qa(record: Any, annotations: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(image id, qa) of one question joined with its annotation; _Bad if either is unusable."""
    if not isinstance(record, dict):
        raise _Bad("malformed record", f"expected a JSON object, got {type(record).__name__}")
    question_id, image_id = _vqav2_id(record, "question_id"), _vqav2_id(record, "image_id")
    question = _vqav2_text(record, "question")
    if not question:
        raise _Bad("bad field", f"question_id {question_id}: 'question' is empty")
    annotation = annotations.get(question_id)
    if annotation is None:
        raise _Bad("missing annotation", f"question_id {question_id}")
    if annotation.get("image_id", image_id) != image_id:
        raise _Bad("bad field", f"question_id {question_id}: annotated for image {annotation['image_id']}")
    answers = _require(annotation, "answers")
    if not isinstance(answers, list) or len(answers) < 2 or not all(isinstance(a, dict) for a in answers):
        raise _Bad("bad field", f"question_id {question_id}: 'answers' must list 2+ annotators' {{'answer': ...}}")
    qa = {
        "question": question,
        "answer": _vqav2_text(annotation, "multiple_choice_answer"),
        "answers": [_vqav2_text(a, "answer") for a in answers],
        "type": _vqav2_text(annotation, "answer_type"),
        "question_type": _vqav2_text(annotation, "question_type") if "question_type" in annotation else "",
        "question_id": question_id,
    }
    return image_id, qa


def _vqav2_id(record: dict[str, Any], field: str) -> int:
    value = _require(record, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Bad("bad field", f"{field!r} must be an integer id >= 0, got {value!r}")
    return value


def _vqav2_text(record: dict[str, Any], field: str) -> str:
    value = _require(record, field)
    if not isinstance(value, str) or _SURROGATES.search(value):
        raise _Bad("bad field", f"{field!r} must be a (valid Unicode) string")
    return value.strip()


def _vqav2_entry(
    image_id: int, qa: list[dict[str, Any]], split: str, patterns: tuple[str, ...], root: Path, allowed: Path
) -> _Entry:
    names = [pattern.format(split=split, image_id=image_id) for pattern in patterns]
    name = next((name for name in names if (root / name).is_file()), names[0])
    image = _image_path(root, name, "image", allowed)
    return _Entry(image, [], {"image_id": image_id, "qa": qa}, image)


def _is_vqav2(path: Path, split: str | None) -> bool:
    """Whether `path` is a folder holding VQAv2's questions file for `split` (default val2014)."""
    split = split or VQAV2_DEFAULT_SPLIT
    split = _VQAV2_SPLITS.get(split, split)
    return (path / VQAV2_QUESTIONS.format(split=split)).is_file()


# ---------------------------------------------------------------------------------------------
# one entry point

READERS: dict[str, Callable[..., CaptionDataset]] = {
    "webdataset": read_webdataset,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "coco_karpathy": read_coco_karpathy,
    "image_folder": read_image_folder,
    "vqav2": read_vqav2,
}
_FORMAT_BY_EXTENSION = {
    ".tar": "webdataset",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "coco_karpathy",
}


def open_dataset(
    path: PathLike,
    split: str | None = None,
    format: str | None = None,
    strict: bool = False,
    image_root: PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label_key: str | None = None,
    **reader_kwargs: Any,
) -> CaptionDataset:
    """Open `path` (a file or a directory) with the right reader, detected unless `format` is set.

    For a directory and a split, looks in order for `{path}/{split}/*.tar`, `{path}/{split}.jsonl`,
    `{path}/{split}.csv`, `{path}/{split}.tsv` and `{path}/{split}/<class>/<images>`; without a
    split, for `{path}/*.tar` and `{path}/<class>/<images>`. A file is read by its extension
    (.tar, .jsonl, .csv/.tsv, .json = COCO; `split` is passed on to the COCO reader).
    `image_root` and `max_pixels` go to every reader (webdataset shards hold their images, so
    it ignores `image_root`), `label_key` to the JSONL and CSV readers (the others find their
    labels themselves); `reader_kwargs` go to the reader (see the `read_*` functions).
    A directory holding VQAv2's `v2_OpenEnded_mscoco_{split}_questions.json` (split default
    val2014) is read by `read_vqav2`.
    """
    if format is not None and format not in READERS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(READERS)}")
    path = Path(path)
    if format == "vqav2" or (format is None and path.is_dir() and _is_vqav2(path, split)):
        vqav2_split = split or VQAV2_DEFAULT_SPLIT
        return read_vqav2(path, vqav2_split, image_root, strict, max_pixels, **reader_kwargs)
    if path.is_file():
        target = path
        format = format or _FORMAT_BY_EXTENSION.get(path.suffix.lower())
        if format is None:
            expected = ", ".join(_FORMAT_BY_EXTENSION)
            raise DataError(f"{path}: unknown file type; expected {expected}")
    elif path.is_dir():
        format, target = _find_in_directory(path, split, format)
    else:
        raise DataError(f"{path}: no such file or directory")
    if format == "coco_karpathy" and split is not None:
        reader_kwargs["split"] = split
    if format != "webdataset":
        reader_kwargs["image_root"] = image_root
    if format in ("jsonl", "csv") and label_key is not None:
        reader_kwargs["label_key"] = label_key
    return READERS[format](target, strict=strict, max_pixels=max_pixels, **reader_kwargs)


def _find_in_directory(path: Path, split: str | None, format: str | None) -> tuple[str, Path]:
    """The first (format, target) in a directory, trying only `format` when it is given."""
    base = path / split if split else path
    candidates = [("webdataset", base, f"{base}/*.tar")]
    if split:
        candidates += [
            ("jsonl", path / f"{split}.jsonl", str(path / f"{split}.jsonl")),
            ("csv", path / f"{split}.csv", str(path / f"{split}.csv")),
            ("csv", path / f"{split}.tsv", str(path / f"{split}.tsv")),
        ]
    candidates.append(("image_folder", base, f"{base}/<class>/<images>"))
    looked_for = []
    for fmt, target, description in candidates:
        if format in (None, fmt):
            looked_for.append(description)
            if _matches(fmt, target):
                return fmt, target
    raise DataError(f"{path}: no data set found; looked for {', '.join(looked_for) or format}")


def _matches(format: str, target: Path) -> bool:
    if format == "webdataset":
        return target.is_dir() and any(target.glob("*.tar"))
    if format == "image_folder":
        return _is_image_folder(target)
    return target.is_file()


# ---------------------------------------------------------------------------------------------
# reporting


def format_skips(skipped: list[Skipped], limit: int = 10) -> str:
    """A summary of skipped samples for logs: counts by kind, then the first `limit` of them.

    "3 samples skipped: 2 corrupt image, 1 empty caption; first 3:" followed by one
    "  source (reason)" line each.
    """
    if not skipped:
        return "0 samples skipped"
    counts = Counter(s.reason.split(":", 1)[0] for s in skipped)
    by_kind = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    noun = "sample" if len(skipped) == 1 else "samples"
    shown = skipped[:limit]
    first = f"; first {len(shown)}:" if shown else ""
    lines = [f"{len(skipped)} {noun} skipped: {by_kind}{first}"]
    lines += [f"  {s.source} ({s.reason})" for s in shown]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
