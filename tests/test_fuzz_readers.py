"""Fuzzing the readers: mutated bytes of valid files never crash them.

Each test mutates a valid file many times with a seeded generator (deterministic: a failure
names the seed, and `mutate(data, random.Random(seed))` rebuilds the input), reads the result in
non-strict and strict mode and touches every item. Whatever the bytes, a reader returns items
that are a `Sample` or a `Skipped`. A `DataError` is allowed in strict mode, and otherwise only
for the whole-file problems a test names (a JSON document that does not parse, a CSV header
without the needed columns).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.formats import (
    CaptionDataset,
    format_skips,
    load_image,
    read_coco_karpathy,
    read_csv,
    read_jsonl,
    read_webdataset,
)
from vlp.data.sample import DataError, Sample, Skipped

# bytes that matter to the formats under test: quotes, separators, newlines, bad UTF-8, paths
INTERESTING = [b'"', b",", b"\t", b"\n", b"\r", b"{", b"]", b"\\", b"\xff", b"\xc3", b"\x00", b"../", b"/"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits of `data`: flip a bit, insert bytes, delete a run, or truncate."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.choice(["flip", "flip", "insert", "delete", "truncate"])
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            random_bytes = rng.randbytes(rng.randint(1, 8))
            data[at:at] = rng.choice(INTERESTING) if rng.random() < 0.5 else random_bytes
        elif kind == "delete":
            del data[at : at + rng.randint(1, 16)]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def image_bytes(format: str, size: tuple[int, int] = (12, 9)) -> bytes:
    array = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


DECODE_KINDS = {"corrupt image", "missing image", "image too large"}


def touch_everything(dataset: CaptionDataset) -> None:
    """Access every item; each is a Sample with an RGB image or a Skipped, and reports print."""
    for i in range(len(dataset)):
        dataset.captions(i), dataset.meta(i)
        item = dataset[i]
        assert isinstance(item, (Sample, Skipped)), item
        if isinstance(item, Sample):
            assert item.image.mode == "RGB"
            item.source.encode()  # error messages and logs can print it
        else:
            assert item.reason.split(":", 1)[0] in DECODE_KINDS, item
            f"{item.source}: {item.reason}".encode()
    for skip in dataset.skipped:
        assert isinstance(skip, Skipped) and ": " in skip.reason
    format_skips(dataset.skipped, limit=len(dataset.skipped)).encode()


def fuzz(
    read: Callable[[bool], CaptionDataset],
    write: Callable[[bytes], None],
    valid: bytes,
    count: int,
    whole_file_errors: tuple[str, ...] = (),
) -> None:
    """Write `count` mutations of `valid` and read each, non-strict then strict.

    Non-strict, the only exception allowed is a DataError whose message contains one of
    `whole_file_errors`; strict, any DataError is allowed.
    """
    for seed in range(count):
        write(mutate(valid, random.Random(seed)))
        for strict in (False, True):
            try:
                touch_everything(read(strict))
            except DataError as error:
                allowed = strict or any(e in str(error) for e in whole_file_errors)
                assert allowed, f"seed {seed}: {error}"
            except Exception as error:
                raise AssertionError(f"seed {seed}, strict={strict}: {type(error).__name__}: {error}") from error


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_fuzzed_images(tmp_path: Path, format: str) -> None:
    """A listing of one mutated image: reading it gives a Sample or a Skipped, and
    `load_image` gives an image or a DataError."""
    image = tmp_path / f"x.{format.lower()}"
    listing = tmp_path / "d.jsonl"
    listing.write_text(json.dumps({"image": image.name, "caption": "c"}) + "\n")

    def read(strict: bool) -> CaptionDataset:
        try:
            load_image(image)
        except DataError as error:
            assert str(error).startswith(f"{image}: ")
        return read_jsonl(listing, strict=strict)

    fuzz(read, image.write_bytes, image_bytes(format), count=150)


def tar_bytes(members: dict[str, bytes], pax: dict[str, str] | None = None) -> bytes:
    """A tar of `members` without the zero padding to 10 KB, so mutations hit headers and data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax or {}
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue().rstrip(b"\0")
    return data + bytes(-len(data) % 512 + 1024)


CAPTION = json.dumps({"caption": ["x", "y"], "n": 1}).encode()
SHARD = {
    f"{key}.{ext}": data
    for key in ("a", "b", "dir/c")
    for ext, data in (("png", image_bytes("PNG", (4, 3))), ("json", CAPTION))
}


@pytest.mark.parametrize("compress", [False, True])
def test_fuzzed_tar_shard(tmp_path: Path, compress: bool) -> None:
    """A shard (plain, or gzipped as tarfile reads too) is read as far as it can be: a corrupt
    shard is a skip, never an exception."""
    shard = tmp_path / "s.tar"
    valid = gzip.compress(tar_bytes(SHARD), mtime=0) if compress else tar_bytes(SHARD)
    fuzz(lambda strict: read_webdataset(shard, strict=strict), shard.write_bytes, valid, count=300)


def test_tarfile_value_error_is_a_corrupt_shard(tmp_path: Path) -> None:
    """tarfile raises more than TarError: a malformed pax sparse map raises ValueError."""
    pax = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "x,y"}
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes({"k.txt": b"caption"}, pax))
    ds = read_webdataset(shard)
    assert len(ds) == 0 and ds.skipped == [Skipped(str(shard), ds.skipped[0].reason)]
    assert ds.skipped[0].reason.startswith("corrupt shard: ValueError: invalid literal")
    with pytest.raises(DataError, match="s.tar: corrupt shard: ValueError"):
        read_webdataset(shard, strict=True)


def test_names_that_are_not_utf8_are_reported_printably(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes({"\udcff.png": image_bytes("PNG", (4, 3))}))  # name: byte 0xff
    (skip,) = read_webdataset(shard).skipped
    assert skip.source == f"{shard}#\\udcff"
    format_skips([skip]).encode()


def test_dds_bytes_named_png_are_a_corrupt_image(tmp_path: Path) -> None:
    """Pillow's DDS plugin raises NotImplementedError for an unknown pixel format: valid DDS
    bytes, one field changed, saved as .png (such a file crashed training)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="DDS")
    dds = bytearray(buffer.getvalue())
    dds[80:88] = (4).to_bytes(4, "little") + b"ABCD"  # pixel format flags FOURCC, fourcc "ABCD"
    (tmp_path / "x.png").write_bytes(dds)
    listing = tmp_path / "d.jsonl"
    listing.write_text('{"image": "x.png", "caption": "c"}\n')
    item = read_jsonl(listing)[0]
    assert item == Skipped(str(tmp_path / "x.png"), item.reason)
    assert item.reason.startswith("corrupt image: NotImplementedError: Unimplemented pixel format")
    with pytest.raises(DataError, match="x.png: corrupt image: NotImplementedError"):
        load_image(tmp_path / "x.png")


def write_images(folder: Path) -> None:
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(image_bytes("PNG", (4, 3)))


def test_fuzzed_jsonl(tmp_path: Path) -> None:
    """JSONL has no whole-file problem: every line is read on its own."""
    write_images(tmp_path)
    records = [
        {"image": "a.png", "caption": "one", "meta": {"k": [1, 2]}},
        {"image": "b.png", "caption": ["two", "deux"]},
        {"image": "a.png", "caption": "three", "flag": True},
    ]
    listing = tmp_path / "d.jsonl"
    valid = "".join(json.dumps(r) + "\n" for r in records).encode()
    fuzz(lambda strict: read_jsonl(listing, strict=strict), listing.write_bytes, valid, count=300)


def test_fuzzed_csv(tmp_path: Path) -> None:
    """CSV: only a header without the needed columns (or not UTF-8) makes the file unusable."""
    write_images(tmp_path)
    listing = tmp_path / "d.csv"
    valid = b'filepath,title,source\na.png,one,web\nb.png,"two, quoted",web\na.png,three,x\n'
    fuzz(
        lambda strict: read_csv(listing, strict=strict),
        listing.write_bytes,
        valid,
        count=300,
        whole_file_errors=(":1: missing column", ":1: header is not UTF-8"),
    )


def test_fuzzed_coco(tmp_path: Path) -> None:
    """COCO JSON is one document: a document that does not parse, or has neither layout, or no
    image of the split, is unusable."""
    write_images(tmp_path)
    sentences = [{"raw": "a"}, {"raw": "b"}]
    data = {
        "images": [
            {"filepath": "", "filename": name, "split": "test", "cocoid": i, "sentences": sentences}
            for i, name in enumerate(["a.png", "b.png"])
        ]
    }
    listing = tmp_path / "c.json"
    fuzz(
        lambda strict: read_coco_karpathy(listing, strict=strict),
        listing.write_bytes,
        json.dumps(data).encode(),
        count=200,
        whole_file_errors=("not valid JSON", "expected Karpathy", "no images in split"),
    )
