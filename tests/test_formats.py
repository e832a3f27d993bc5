"""Readers for real data formats (vlp.data.formats) and image transforms (vlp.data.transforms)."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlp.data.formats import (
    DEFAULT_MAX_PIXELS,
    format_skips,
    load_image,
    open_dataset,
    read_coco_karpathy,
    read_csv,
    read_image_folder,
    read_jsonl,
    read_webdataset,
)
from vlp.data.sample import DataError, Sample, Skipped
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, sample_crop, train_transform

# ---------------------------------------------------------------------------------------------
# fixtures: tiny images written in each format


def pixels(seed: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    """A small random RGB image (height, width, 3) that differs per seed."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = pixels(seed)
    path.write_bytes(png_bytes(array))
    return array


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_image(sample: Sample | Skipped, expected: np.ndarray) -> None:
    assert isinstance(sample, Sample), sample
    assert sample.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(sample.image), expected)


# ---------------------------------------------------------------------------------------------
# webdataset


def shapes_like_shards(root: Path, split: str = "train") -> list[np.ndarray]:
    """Two shards in the shapes-world layout: {root}/{split}/{split}-{shard:06d}.tar."""
    arrays = [pixels(i) for i in range(3)]
    for shard, indices in enumerate([[0, 1], [2]]):
        members = {}
        for i in indices:
            members[f"{split}_{i:08d}.png"] = png_bytes(arrays[i])
            caption = {"caption": [f"caption {i}", "", f"other {i}"], "objects": i + 1}
            members[f"{split}_{i:08d}.json"] = json.dumps(caption).encode()
        write_tar(root / split / f"{split}-{shard:06d}.tar", members)
    return arrays


def test_webdataset_round_trip(tmp_path: Path) -> None:
    arrays = shapes_like_shards(tmp_path)
    ds = read_webdataset(str(tmp_path / "train" / "train-{000000..000001}.tar"))
    assert len(ds) == 3 and ds.skipped == []
    for i in range(3):
        assert ds.captions(i) == [f"caption {i}", f"other {i}"]  # the empty caption is dropped
        assert ds.meta(i) == {"objects": i + 1}
        sample = ds[i]
        assert_image(sample, arrays[i])
        assert sample.captions == ds.captions(i) and sample.meta == ds.meta(i)
    shard = tmp_path / "train" / "train-000001.tar"
    assert ds[2].source == f"{shard}#train_00000002"


def test_webdataset_accepts_directory_glob_and_list(tmp_path: Path) -> None:
    shapes_like_shards(tmp_path)
    shards = sorted((tmp_path / "train").glob("*.tar"))
    for urls in (tmp_path / "train", str(tmp_path / "train" / "*.tar"), shards, str(shards[1])):
        ds = read_webdataset(urls)
        assert [ds.captions(i)[0] for i in range(len(ds))] == (
            ["caption 2"] if urls == str(shards[1]) else ["caption 0", "caption 1", "caption 2"]
        )
    pattern = r"train-\{000000\.\.000009\}\.tar: shard not found: .*train-000002.tar$"
    with pytest.raises(DataError, match=pattern):
        read_webdataset(str(tmp_path / "train" / "train-{000000..000009}.tar"))


def test_webdataset_txt_caption_and_nested_key(tmp_path: Path) -> None:
    array = pixels(7)
    shard = write_tar(
        tmp_path / "a.tar",
        {"dir/x.y.jpeg": b"unused", "dir/x.y.png": png_bytes(array), "dir/x.y.txt": b" a cat \n"},
    )
    ds = read_webdataset(shard, image_keys=("png", "jpeg"))
    assert len(ds) == 0 and len(ds.skipped) == 1  # key "dir/x" has no member with extension "png"
    ds = read_webdataset(shard, image_keys=("y.png",), text_keys=("y.txt",))
    assert ds.captions(0) == ["a cat"] and ds.meta(0) == {}
    assert_image(ds[0], array)
    assert ds[0].source == f"{shard}#dir/x"


def test_webdataset_index_problems(tmp_path: Path) -> None:
    shard = write_tar(
        tmp_path / "bad.tar",
        {
            "ok.png": png_bytes(pixels(0)),
            "ok.json": b'{"caption": "fine"}',
            "nojson.png": png_bytes(pixels(1)),
            "empty.png": png_bytes(pixels(2)),
            "empty.json": b'{"caption": ["", "  "]}',
            "broken.png": png_bytes(pixels(3)),
            "broken.json": b'{"caption": ',
            "nocap.png": png_bytes(pixels(4)),
            "nocap.json": b'{"text": "x"}',
        },
    )
    ds = read_webdataset(shard)
    assert len(ds) == 1 and ds.captions(0) == ["fine"]
    reasons = {s.source: s.reason.split(":")[0] for s in ds.skipped}
    assert reasons == {
        f"{shard}#nojson": "missing field",
        f"{shard}#empty": "empty caption",
        f"{shard}#broken": "malformed member",
        f"{shard}#nocap": "missing field",
    }
    with pytest.raises(DataError, match=f"{shard}#nojson: missing field"):
        read_webdataset(shard, strict=True)


def test_webdataset_corrupt_image_is_skipped_at_decode_time(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "c.tar", {"k.png": b"not a png", "k.txt": b"caption"})
    ds = read_webdataset(shard)
    assert ds.captions(0) == ["caption"]  # the listing does not decode
    item = ds[0]
    assert isinstance(item, Skipped)
    assert item.source == f"{shard}#k" and item.reason.startswith("corrupt image:")
    with pytest.raises(DataError, match=f"{shard}#k: corrupt image"):
        read_webdataset(shard, strict=True)[0]


# ---------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip(tmp_path: Path) -> None:
    a = write_png(tmp_path / "images" / "a.png", 0)
    b = write_png(tmp_path / "elsewhere" / "b.png", 1)
    gray = np.full((4, 3), 77, dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "images" / "g.png")
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "images/a.png", "caption": "one", "split": "train", "graph": {"n": 1}},
            {"image": str(tmp_path / "elsewhere" / "b.png"), "caption": ["two", "", "deux"]},
            "",
            {"image": "images/g.png", "caption": "gray"},
        ],
    )
    ds = read_jsonl(path)
    assert ds.source == str(path) and len(ds) == 3 and ds.skipped == []
    assert ds.captions(0) == ["one"] and ds.meta(0) == {"split": "train", "graph": {"n": 1}}
    assert ds.captions(1) == ["two", "deux"] and ds.meta(1) == {}
    assert_image(ds[0], a)
    assert_image(ds[1], b)
    assert_image(ds[2], np.repeat(gray[:, :, None], 3, axis=2))  # converted to RGB
    assert ds[0].source == str(tmp_path / "images" / "a.png")
    ds.meta(0)["graph"]["n"] = 5  # the dataset hands out copies
    assert ds.meta(0)["graph"] == {"n": 1}


def test_jsonl_custom_keys(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 0)
    path = write_jsonl(tmp_path / "d.jsonl", [{"file": "a.png", "text": "hi", "caption": "meta"}])
    ds = read_jsonl(path, image_key="file", caption_key="text")
    assert ds.captions(0) == ["hi"] and ds.meta(0) == {"caption": "meta"}


BAD_JSONL_LINES = {
    2: ('{"image": "a.png", "caption": ', "malformed line"),
    3: ({"image": "a.png"}, "missing field: 'caption'"),
    4: ({"image": "a.png", "caption": ["", " "]}, "empty caption"),
    5: ({"image": "gone.png", "caption": "x"}, "missing image"),
    6: ({"image": "a.png", "caption": 3}, "bad field: 'caption'"),
    7: ('["a.png", "x"]', "malformed line"),
}


def bad_jsonl(tmp_path: Path, bad_line: int | None = None) -> Path:
    """A JSONL file whose line 1 is good and lines 2-7 are bad (or only `bad_line`)."""
    write_png(tmp_path / "a.png", 0)
    lines = [{"image": "a.png", "caption": "good"}]
    for number, (line, _) in BAD_JSONL_LINES.items():
        if bad_line in (None, number):
            lines.append(line)
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_jsonl_index_problems_are_counted(tmp_path: Path) -> None:
    path = bad_jsonl(tmp_path)
    ds = read_jsonl(path)
    assert len(ds) == 1 and ds.captions(0) == ["good"]
    assert [s.source for s in ds.skipped] == [f"{path}:{n}" for n in BAD_JSONL_LINES]
    for skip, (_, reason) in zip(ds.skipped, BAD_JSONL_LINES.values()):
        assert skip.reason.startswith(reason)
    assert str(tmp_path / "gone.png") in ds.skipped[3].reason


@pytest.mark.parametrize("number", list(BAD_JSONL_LINES))
def test_jsonl_strict_names_file_and_line(tmp_path: Path, number: int) -> None:
    path = bad_jsonl(tmp_path, number)
    with pytest.raises(DataError) as error:
        read_jsonl(path, strict=True)
    assert str(error.value).startswith(f"{path}:2: {BAD_JSONL_LINES[number][1]}")


def test_jsonl_corrupt_and_vanished_images(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    write_png(tmp_path / "soon_gone.png", 1)
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"image": "bad.png", "caption": "x"}, {"image": "soon_gone.png", "caption": "y"}],
    )
    ds, strict = read_jsonl(path), read_jsonl(path, strict=True)
    (tmp_path / "soon_gone.png").unlink()
    corrupt, vanished = ds[0], ds[1]
    assert corrupt == Skipped(str(tmp_path / "bad.png"), corrupt.reason)
    assert corrupt.reason.startswith("corrupt image:")
    assert vanished.source == str(tmp_path / "soon_gone.png")
    assert vanished.reason.startswith("missing image:")
    with pytest.raises(DataError, match=f"{tmp_path / 'bad.png'}: corrupt image"):
        strict[0]
    with pytest.raises(DataError, match=f"{tmp_path / 'soon_gone.png'}: missing image"):
        strict[1]


def test_deeply_nested_json_is_malformed_not_a_crash(tmp_path: Path) -> None:
    """json raises RecursionError, not ValueError, on deep nesting (untrusted input)."""
    nested = '{"image": "a.png", "caption": ' + "[" * 100_000 + "}"
    path = write_jsonl(tmp_path / "d.jsonl", [nested])
    assert read_jsonl(path).skipped[0].reason.startswith("malformed line: maximum recursion")
    members = {"k.png": png_bytes(pixels(0)), "k.json": nested.encode()}
    shard = write_tar(tmp_path / "s.tar", members)
    reason = read_webdataset(shard).skipped[0].reason
    assert reason.startswith("malformed member: .json: maximum recursion")
    (tmp_path / "c.json").write_text(nested)
    with pytest.raises(DataError, match="c.json: not valid JSON: maximum recursion depth"):
        read_coco_karpathy(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# CSV / TSV


def test_csv_shapes_layout_merges_rows(tmp_path: Path) -> None:
    a = write_png(tmp_path / "train" / "a.png", 0)
    b = write_png(tmp_path / "train" / "b.png", 1)
    path = tmp_path / "train.csv"
    path.write_text("filepath\ttitle\ntrain/a.png\tfirst a\ntrain/b.png\tonly b, with a comma\ntrain/a.png\tsecond a\n")
    ds = read_csv(path)
    assert len(ds) == 2 and ds.skipped == []
    assert ds.captions(0) == ["first a", "second a"]
    assert ds.captions(1) == ["only b, with a comma"]
    assert_image(ds[0], a)
    assert_image(ds[1], b)


def test_csv_comma_tsv_and_custom_columns(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 0)
    (tmp_path / "c.csv").write_text('url,text,source\na.png,"hello, world",web\n')
    ds = read_csv(tmp_path / "c.csv", image_key="url", caption_key="text")
    assert ds.captions(0) == ["hello, world"] and ds.meta(0) == {"source": "web"}
    (tmp_path / "t.tsv").write_text("title\tfilepath\nhi, there\ta.png\n")
    assert read_csv(tmp_path / "t.tsv").captions(0) == ["hi, there"]
    (tmp_path / "p.txt").write_text("filepath|title\na.png|piped\n")
    assert read_csv(tmp_path / "p.txt", sep="|").captions(0) == ["piped"]


def test_csv_missing_column_always_raises(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("filepath,caption\na.png,x\n")
    with pytest.raises(DataError, match=f"{path}:1: missing column 'title'.*filepath, caption"):
        read_csv(path)


def test_csv_row_problems(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 0)
    path = tmp_path / "c.tsv"
    path.write_text("filepath\ttitle\na.png\tgood\na.png\t  \ngone.png\tx\ngone.png\ty\na.png\ttoo\tmany\n")
    ds = read_csv(path)
    assert len(ds) == 1 and ds.captions(0) == ["good"]
    assert [(s.source, s.reason.split(":")[0]) for s in ds.skipped] == [
        (f"{path}:3", "empty caption"),
        (f"{path}:6", "malformed row"),
        (f"{path}:4", "missing image"),  # once per image, at its first row
    ]
    with pytest.raises(DataError, match=f"{path}:3: empty caption: column 'title'"):
        read_csv(path, strict=True)


def test_csv_row_with_bad_bytes_is_skipped_alone(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 0)
    write_png(tmp_path / "b.png", 1)
    path = tmp_path / "c.csv"
    path.write_bytes(b"filepath,title\na.png,caf\xe9 latin-1\nb.png,ok\na.png,caf\xc3\xa9 utf-8\n")
    ds = read_csv(path)
    assert [ds.captions(i) for i in range(len(ds))] == [["ok"], ["caf\u00e9 utf-8"]]
    assert ds.skipped == [Skipped(f"{path}:2", "malformed row: not UTF-8")]
    with pytest.raises(DataError, match=f"^{path}:2: malformed row: not UTF-8$"):
        read_csv(path, strict=True)
    path.write_bytes(b"filepath,title,caf\xe9\na.png,ok,x\n")
    with pytest.raises(DataError, match=f"^{path}:1: header is not UTF-8$"):
        read_csv(path)


def test_caption_that_is_not_unicode_is_skipped(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 0)
    path = write_jsonl(tmp_path / "d.jsonl", ['{"image": "a.png", "caption": "bad \\udcff"}'])
    assert read_jsonl(path).skipped == [
        Skipped(f"{path}:1", "bad field: 'caption' is not valid Unicode (a lone surrogate)")
    ]


# ---------------------------------------------------------------------------------------------
# COCO (Karpathy and BLIP/LAVIS layouts)


def test_coco_karpathy_layout(tmp_path: Path) -> None:
    arrays = {
        name: write_png(tmp_path / "coco" / "val2014" / f"{name}.png", i)
        for i, name in enumerate(["tr", "rv", "va", "te"])
    }
    images = [
        {
            "filepath": "val2014",
            "filename": f"{name}.png",
            "split": split,
            "cocoid": 100 + i,
            "imgid": i,
            "sentences": [{"raw": f"{name} one"}, {"raw": f"{name} two"}],
        }
        for i, (name, split) in enumerate([("tr", "train"), ("rv", "restval"), ("va", "val"), ("te", "test")])
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    root = tmp_path / "coco"
    train = read_coco_karpathy(path, split="train", image_root=root)
    assert [train.captions(i)[0] for i in range(len(train))] == ["tr one", "rv one"]
    test = read_coco_karpathy(path, image_root=root)
    assert len(test) == 1 and test.captions(0) == ["te one", "te two"]
    assert test.meta(0) == {"cocoid": 103, "imgid": 3, "split": "test", "image_id": 103}
    assert_image(test[0], arrays["te"])
    assert len(read_coco_karpathy(path, split="val", image_root=root)) == 1
    path.write_text(json.dumps({"images": images[:2]}))
    with pytest.raises(DataError, match="no images in split 'test' .*present: restval, train"):
        read_coco_karpathy(path, image_root=root)
    path.write_text(json.dumps({"images": images}))
    missing = read_coco_karpathy(path)  # default image_root: the JSON's folder, no val2014/ there
    assert len(missing) == 0 and missing.skipped[0].source == f"{path}:images[3]"


def test_coco_lavis_layout(tmp_path: Path) -> None:
    a = write_png(tmp_path / "val2014" / "a.png", 0)
    write_png(tmp_path / "val2014" / "b.png", 1)
    path = tmp_path / "coco_karpathy_test.json"
    path.write_text(
        json.dumps(
            [
                {"image": "val2014/a.png", "caption": ["a one", "a two"], "image_id": 5},
                {"image": "val2014/b.png", "caption": "b one", "image_id": "b"},
                {"image": "val2014/b.png", "caption": ""},
            ]
        )
    )
    ds = read_coco_karpathy(path, split="train")  # split is ignored for this layout
    assert len(ds) == 2
    assert ds.captions(0) == ["a one", "a two"] and ds.meta(0) == {"image_id": 5}
    assert ds.captions(1) == ["b one"] and ds.meta(1) == {"image_id": "b"}
    assert_image(ds[0], a)
    assert ds.skipped == [Skipped(f"{path}:[2]", ds.skipped[0].reason)]
    with pytest.raises(DataError, match=rf"{path}:\[2\]: empty caption"):
        read_coco_karpathy(path, strict=True)


def test_coco_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"images": [}')
    with pytest.raises(DataError, match=f"{path}: not valid JSON"):
        read_coco_karpathy(path)
    path.write_text('{"annotations": []}')
    with pytest.raises(DataError, match=f"{path}: expected Karpathy"):
        read_coco_karpathy(path)


# ---------------------------------------------------------------------------------------------
# image folder


def test_image_folder(tmp_path: Path) -> None:
    dog = write_png(tmp_path / "dog" / "1.png", 0)
    write_png(tmp_path / "cat" / "2.png", 1)
    write_png(tmp_path / "cat" / "nested" / "3.png", 2)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_text("hidden")
    ds = read_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert [ds.meta(i) for i in range(len(ds))] == [
        {"label": "cat", "label_id": 0},
        {"label": "cat", "label_id": 0},
        {"label": "dog", "label_id": 1},
    ]
    assert ds.captions(2) == [] and ds[2].captions == []
    assert_image(ds[2], dog)
    assert [s.source for s in ds.skipped] == [str(tmp_path / "cat" / "notes.txt")]
    with pytest.raises(DataError, match="notes.txt: not an image"):
        read_image_folder(tmp_path, strict=True)


# ---------------------------------------------------------------------------------------------
# confinement: listed images must lie inside a root folder


def escaping_images(tmp_path: Path) -> tuple[Path, list[str]]:
    """`tmp_path/data/` (the data set) and `tmp_path/secret.png` outside it; returns the data
    folder and four ways its listings reach the secret: ../, an absolute path, a symlinked file
    and a file in a symlinked folder. `data/ok.png` is inside."""
    data = tmp_path / "data"
    write_png(data / "ok.png", 0)
    write_png(tmp_path / "secret.png", 1)
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    (data / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    absolute = str(tmp_path / "secret.png")
    return data, ["../secret.png", absolute, "link.png", "linked_dir/secret.png"]


def listed(paths: list[str]) -> list[dict[str, str]]:
    return [{"image": p, "caption": "c"} for p in paths]


def assert_confined(ds, data: Path, escapes: list[str], where: list[str]) -> None:
    assert len(ds) == 1 and ds[0].source == str(data / "ok.png")
    assert [s.source for s in ds.skipped] == where
    root = data.resolve()
    for skip, escape in zip(ds.skipped, escapes):
        assert skip.reason == (
            f"path outside data set: {data / escape} is not inside {root}; set image_root (data.image_root) to allow it"
        )


def test_jsonl_and_csv_images_are_confined_to_the_listing_folder(tmp_path: Path) -> None:
    data, escapes = escaping_images(tmp_path)
    listing = write_jsonl(data / "d.jsonl", listed(["ok.png", *escapes]))
    assert_confined(read_jsonl(listing), data, escapes, [f"{listing}:{n}" for n in range(2, 6)])
    with pytest.raises(DataError, match=rf"^{listing}:2: path outside data set: .*secret.png is"):
        read_jsonl(listing, strict=True)
    assert len(read_jsonl(listing, image_root=tmp_path)) == 5  # an explicit root allows them
    assert len(read_jsonl(listing, image_root="/")) == 5
    write_jsonl(listing, listed(["nul\x00.png"]))
    unusable = "bad field: unusable path " + repr(str(data / "nul\x00.png"))
    assert read_jsonl(listing).skipped[0].reason == unusable
    table = data / "c.tsv"
    table.write_text("filepath\ttitle\n" + "".join(f"{p}\tc\n" for p in ["ok.png", *escapes]))
    assert_confined(read_csv(table), data, escapes, [f"{table}:{n}" for n in range(3, 7)])
    assert len(read_csv(table, image_root=tmp_path)) == 5
    with pytest.raises(DataError, match="path outside data set"):
        read_csv(table, strict=True)


def test_coco_images_are_confined_to_the_image_root(tmp_path: Path) -> None:
    data, escapes = escaping_images(tmp_path)
    lavis = data / "lavis.json"
    lavis.write_text(json.dumps(listed(["ok.png", *escapes])))
    where = [f"{lavis}:[{i}]" for i in range(1, 5)]
    assert_confined(read_coco_karpathy(lavis), data, escapes, where)
    karpathy = data / "dataset_coco.json"
    records = [
        {"filepath": folder, "filename": name, "split": "test", "sentences": [{"raw": "c"}]}
        for folder, name in [("", p) for p in ["ok.png", *escapes]] + [("..", "secret.png")]
    ]
    karpathy.write_text(json.dumps({"images": records}))
    ds = read_coco_karpathy(karpathy)
    assert_confined(ds, data, escapes, [f"{karpathy}:images[{i}]" for i in range(1, 6)])
    outside = f"path outside data set: {data / '..' / 'secret.png'} is not inside"
    assert ds.skipped[4].reason.startswith(outside)  # through "filepath"
    assert len(read_coco_karpathy(karpathy, image_root=data.resolve())) == 1
    with pytest.raises(DataError, match=r"images\[1\]: path outside data set"):
        read_coco_karpathy(karpathy, strict=True)


def test_image_folder_refuses_symlinks_out(tmp_path: Path) -> None:
    data, _ = escaping_images(tmp_path)
    folder = tmp_path / "folder"
    write_png(folder / "cat" / "1.png", 0)
    (folder / "cat" / "2.png").symlink_to(tmp_path / "secret.png")
    (folder / "dog").symlink_to(data, target_is_directory=True)  # a class folder that is a link
    ds = read_image_folder(folder)
    assert ds.classes == ["cat", "dog"] and len(ds) == 1
    assert ds[0].source == str(folder / "cat" / "1.png")
    outside = [folder / "cat" / "2.png", folder / "dog" / "link.png", folder / "dog" / "ok.png"]
    assert [s.source for s in ds.skipped] == [str(p) for p in outside]
    assert {s.reason.split(":")[0] for s in ds.skipped} == {"path outside data set"}
    assert len(read_image_folder(folder, image_root=tmp_path)) == 4
    with pytest.raises(DataError, match="2.png: path outside data set"):
        read_image_folder(folder, strict=True)


def test_open_dataset_passes_image_root_and_max_pixels_to_every_format(tmp_path: Path) -> None:
    data, escapes = escaping_images(tmp_path)
    write_jsonl(data / "val.jsonl", listed(["ok.png", *escapes]))
    rows = "".join(f"{p},c\n" for p in ["ok.png", *escapes])
    (data / "val.csv").write_text("filepath,title\n" + rows)
    (data / "ann").mkdir()
    (data / "ann" / "c.json").write_text(json.dumps(listed(["ok.png"])))
    write_png(data / "folder" / "a" / "1.png", 0)
    (data / "folder" / "a" / "2.png").symlink_to(tmp_path / "secret.png")
    shapes_like_shards(data, "shards")
    cases = [  # path, image_root, items by default, items with image_root
        (data / "val.jsonl", tmp_path, 1, 5),
        (data / "val.csv", tmp_path, 1, 5),
        (data / "ann" / "c.json", data, 0, 1),  # COCO: image_root is also the base of paths
        (data / "folder", tmp_path, 1, 2),
        (data / "shards", tmp_path, 3, 3),  # webdataset: images in the shards, root ignored
    ]
    for path, root, default, allowed in cases:
        assert len(open_dataset(path)) == default, path
        ds = open_dataset(path, image_root=root, max_pixels=29)  # the images are 6x5 = 30 pixels
        assert len(ds) == allowed, path
        assert ds[0].reason.startswith("image too large: 6x5 pixels, cap 29"), path
        assert isinstance(open_dataset(path, image_root=root, max_pixels=30)[0], Sample), path


# ---------------------------------------------------------------------------------------------
# decoding: pixel cap, EXIF orientation, load_image


@pytest.fixture(scope="module")
def pixel_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A black 9000x9000 1-bit PNG: a 10 KB file that decodes to 81 M pixels (243 MB as RGB)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)
    assert path.stat().st_size < 20_000
    return path


def test_images_over_the_pixel_cap_are_skipped_before_decoding(
    tmp_path: Path, pixel_bomb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png(tmp_path / "small.png", 0)
    listing = write_jsonl(tmp_path / "d.jsonl", listed([str(pixel_bomb), "small.png"]))
    ds = read_jsonl(listing, image_root="/", max_pixels=1_000_000)
    too_large = "image too large: 9000x9000 pixels, cap 1000000 (data.max_pixels)"
    with monkeypatch.context() as patch:  # pytest.fail is no Exception: _decode cannot catch it
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
        assert ds[0] == Skipped(str(pixel_bomb), too_large)
    assert_image(ds[1], pixels(0))  # a normal image passes the cap
    assert DEFAULT_MAX_PIXELS == 50_000_000
    by_default = read_jsonl(listing, image_root="/")[0]
    assert by_default.reason.startswith("image too large: 9000x9000 pixels, cap 50000000")
    with pytest.raises(DataError, match=f"{pixel_bomb}: image too large"):
        read_jsonl(listing, image_root="/", strict=True, max_pixels=1_000_000)[0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A 40x20 JPEG whose EXIF says "rotate 90 degrees clockwise to view" (orientation 6)."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, 20:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    listing = write_jsonl(tmp_path / "d.jsonl", listed(["phone.jpg"]))
    image = read_jsonl(listing)[0].image
    assert image.size == (20, 40)  # width x height: upright
    upright = np.asarray(image).astype(int)
    assert upright[:15].mean() < 30 and upright[25:].mean() > 225  # the left half is now on top
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_load_image(tmp_path: Path, pixel_bomb: Path) -> None:
    expected = write_png(tmp_path / "a.png", 0)
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    for name, reason in [
        ("bad.png", "corrupt image: UnidentifiedImageError: cannot identify"),
        ("gone.png", "missing image: no such file"),
        ("a.png", "image too large: 6x5 pixels, cap 29"),
    ]:
        with pytest.raises(DataError, match=f"^{tmp_path / name}: {reason}"):
            load_image(tmp_path / name, max_pixels=29)
    with pytest.raises(DataError, match=f"^{pixel_bomb}: image too large: 9000x9000 pixels, cap 5"):
        load_image(pixel_bomb)


def test_caption_command_skips_bad_images(tmp_path: Path) -> None:
    """`vlp caption` reports a bad image on stderr and captions the rest; it fails only when no
    image is left. The model is a tiny BLIP with random weights: any caption will do."""
    from typer.testing import CliRunner

    import vlp
    from tests.test_fusion_models import TEXT, model_config
    from vlp.cli import app
    from vlp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a red circle", "a blue square left of a circle"], vocab_size=60)
    torch.manual_seed(0)
    text = {**TEXT, "vocab_size": tokenizer.vocab_size}
    config = model_config("blip", text=text, tokens=tokenizer.special_ids())
    model = vlp.create_model("blip", config)
    model.tokenizer = tokenizer
    run = vlp.save(model, tmp_path / "run")
    good, bad, gone = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "gone.png"
    write_png(good, 0)
    bad.write_bytes(b"not an image")
    runner = CliRunner()
    result = runner.invoke(app, ["caption", str(run), str(bad), str(good), str(gone), "--decoding", "greedy"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{good}\t") and result.stdout.count("\n") == 1
    assert result.stderr.splitlines() == [
        f"skipped {bad}: corrupt image: UnidentifiedImageError: cannot identify image file " + repr(str(bad)),
        f"skipped {gone}: missing image: no such file",
    ]
    result = runner.invoke(app, ["caption", str(run), str(bad)])
    assert result.exit_code == 1 and result.stdout == ""
    assert "bad.png: corrupt image" in result.stderr and "no image could be read" in result.stderr


# ---------------------------------------------------------------------------------------------
# open_dataset


def test_open_dataset_detects_shapes_world_layouts(tmp_path: Path) -> None:
    (tmp_path / "info.json").write_text("{}")
    shapes_like_shards(tmp_path, "train")
    write_png(tmp_path / "images" / "v.png", 0)
    write_jsonl(tmp_path / "val.jsonl", [{"image": "images/v.png", "caption": ["val"]}])
    rows = "filepath\ttitle\nimages/v.png\ttest a\nimages/v.png\ttest b\n"
    (tmp_path / "test.csv").write_text(rows)
    train = open_dataset(tmp_path, split="train")
    assert len(train) == 3 and train.source == str(tmp_path / "train")
    assert open_dataset(tmp_path, split="val").captions(0) == ["val"]
    assert open_dataset(tmp_path, split="test").captions(0) == ["test a", "test b"]
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path, split="dev")
    for looked_for in ("dev/*.tar", "dev.jsonl", "dev.csv", "dev.tsv", "dev/<class>/<images>"):
        assert looked_for in str(error.value)


def test_open_dataset_files_folders_and_explicit_format(tmp_path: Path) -> None:
    shapes_like_shards(tmp_path, "train")
    assert len(open_dataset(tmp_path / "train" / "train-000000.tar")) == 2
    assert len(open_dataset(tmp_path / "train")) == 3  # a directory of shards, no split
    write_png(tmp_path / "folder" / "val" / "a" / "1.png", 0)
    assert open_dataset(tmp_path / "folder", split="val").classes == ["a"]
    assert open_dataset(tmp_path / "folder" / "val").classes == ["a"]
    write_png(tmp_path / "x.png", 1)
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "x.png", "caption": "c"}]))
    assert open_dataset(tmp_path / "ann.json", split="val").captions(0) == ["c"]
    data = tmp_path / "listing.txt"
    write_jsonl(data, [{"file": "x.png", "caption": "c"}])
    assert len(open_dataset(data, format="jsonl", image_key="file")) == 1
    with pytest.raises(DataError, match="unknown file type"):
        open_dataset(data)
    with pytest.raises(DataError, match="looked for .*train.jsonl$"):
        open_dataset(tmp_path, split="train", format="jsonl")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        open_dataset(tmp_path, format="parquet")
    with pytest.raises(DataError, match="no such file or directory"):
        open_dataset(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# format_skips


def test_format_skips() -> None:
    skipped = [
        Skipped("a.tar#1", "corrupt image: cannot identify image file"),
        Skipped("d.jsonl:4", "empty caption: field 'caption' has no non-empty caption"),
        Skipped("a.tar#7", "corrupt image: truncated"),
    ]
    assert format_skips(skipped, limit=2) == (
        "3 samples skipped: 2 corrupt image, 1 empty caption; first 2:\n"
        "  a.tar#1 (corrupt image: cannot identify image file)\n"
        "  d.jsonl:4 (empty caption: field 'caption' has no non-empty caption)\n"
        "  ... and 1 more"
    )
    assert format_skips(skipped[:1]).startswith("1 sample skipped: 1 corrupt image; first 1:\n")
    assert format_skips([]) == "0 samples skipped"


# ---------------------------------------------------------------------------------------------
# transforms


def textured_image(width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(pixels(3, (width, height)))


def test_train_transform_is_a_function_of_the_seed() -> None:
    transform = train_transform(32)
    image = textured_image()
    torch_state, random_state = torch.get_rng_state(), random.getstate()
    first = transform(image, random.Random(5))
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, transform(image, random.Random(5)))
    assert not torch.equal(first, transform(image, random.Random(6)))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == random_state
    restored = pickle.loads(pickle.dumps(transform))  # DataLoader workers can receive it
    assert torch.equal(restored(image, random.Random(5)), first)


@pytest.mark.parametrize("width,height", [(400, 300), (300, 400), (97, 101)])
def test_sample_crop_stays_in_bounds(width: int, height: int) -> None:
    scale, ratio = (0.5, 0.9), (3 / 4, 4 / 3)
    boxes = set()
    for seed in range(200):
        top, left, h, w = sample_crop(width, height, random.Random(seed), scale, ratio)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert scale[0] - 0.02 <= h * w / (width * height) <= scale[1] + 0.02
        assert ratio[0] - 0.03 <= w / h <= ratio[1] + 0.03
        boxes.add((top, left, h, w))
    assert len(boxes) > 150  # different seeds give different crops...
    assert len({(top, left) for top, left, _, _ in boxes}) > 100  # ...at different places


def test_sample_crop_falls_back_to_a_centre_crop() -> None:
    # no box of aspect ratio <= 4/3 covers half of a 200x20 image, so the fallback is used
    assert sample_crop(200, 20, random.Random(0), (0.5, 1.0), (3 / 4, 4 / 3)) == (0, 86, 20, 27)


def test_eval_transform_normalises_and_centre_crops() -> None:
    transform = eval_transform(16)
    constant = transform(Image.new("RGB", (40, 30), (255, 128, 0)))
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), CLIP_MEAN, CLIP_STD)]
    assert constant.shape == (3, 16, 16) and constant.dtype == torch.float32
    torch.testing.assert_close(constant, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16))
    # three vertical bands red | green | blue: the centre crop of the resized image is all green
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32, 0] = bands[:, 32:64, 1] = bands[:, 64:, 2] = 255
    green = transform(Image.fromarray(bands))
    expected_green = [(v - m) / s for v, m, s in zip((0, 1, 0), CLIP_MEAN, CLIP_STD)]
    expected_green = torch.tensor(expected_green).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(green[:, 4:12, 4:12], expected_green)


def test_train_transform_full_crop_matches_eval() -> None:
    image = textured_image(48, 48)
    full = train_transform(24, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, random.Random(0))
    torch.testing.assert_close(full, eval_transform(24)(image))
