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
from PIL import Image

from vlp.data.formats import (
    format_skips,
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


# ---------------------------------------------------------------------------------------------
# CSV / TSV


def test_csv_shapes_layout_merges_rows(tmp_path: Path) -> None:
    a = write_png(tmp_path / "train" / "a.png", 0)
    b = write_png(tmp_path / "train" / "b.png", 1)
    path = tmp_path / "train.csv"
    path.write_text(
        "filepath\ttitle\n"
        "train/a.png\tfirst a\n"
        "train/b.png\tonly b, with a comma\n"
        "train/a.png\tsecond a\n"
    )
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
    path.write_text(
        "filepath\ttitle\n"
        "a.png\tgood\n"
        "a.png\t  \n"
        "gone.png\tx\n"
        "gone.png\ty\n"
        "a.png\ttoo\tmany\n"
    )
    ds = read_csv(path)
    assert len(ds) == 1 and ds.captions(0) == ["good"]
    assert [(s.source, s.reason.split(":")[0]) for s in ds.skipped] == [
        (f"{path}:3", "empty caption"),
        (f"{path}:6", "malformed row"),
        (f"{path}:4", "missing image"),  # once per image, at its first row
    ]
    with pytest.raises(DataError, match=f"{path}:3: empty caption: column 'title'"):
        read_csv(path, strict=True)


# ---------------------------------------------------------------------------------------------
# COCO (Karpathy and BLIP/LAVIS layouts)


def test_coco_karpathy_layout(tmp_path: Path) -> None:
    arrays = {name: write_png(tmp_path / "coco" / "val2014" / f"{name}.png", i)
              for i, name in enumerate(["tr", "rv", "va", "te"])}
    images = [
        {"filepath": "val2014", "filename": f"{name}.png", "split": split, "cocoid": 100 + i,
         "imgid": i, "sentences": [{"raw": f"{name} one"}, {"raw": f"{name} two"}]}
        for i, (name, split) in enumerate(
            [("tr", "train"), ("rv", "restval"), ("va", "val"), ("te", "test")])
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
    path.write_text(json.dumps([
        {"image": "val2014/a.png", "caption": ["a one", "a two"], "image_id": 5},
        {"image": "val2014/b.png", "caption": "b one", "image_id": "b"},
        {"image": "val2014/b.png", "caption": ""},
    ]))
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
