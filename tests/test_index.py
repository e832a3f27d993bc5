"""`vlp index build` / `search` (docs/apps.md): search finds the image a text describes; a
rebuild follows added, changed and deleted files; a killed build resumes to the same index;
unusual and broken files are indexed or skipped; HNSW's recall against exact search."""

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_clip
from PIL import Image
from test_apps import ScaledOracle
from test_eval_any_data import image, image_folder
from typer.testing import CliRunner

import vlp
from vlp.apps.index import Index, build, decode_workers, faiss_index, vector_blocks
from vlp.cli import app
from vlp.data.formats import write_webdataset


class CountingOracle(ScaledOracle):
    """Counts the images it embeds (a rebuild must embed only what changed)."""

    embedded = 0

    def encode_image(self, images):
        self.embedded += len(images)
        return super().encode_image(images)


def test_search_finds_the_images_a_text_describes(tmp_path):
    folder = image_folder(tmp_path / "photos", {"red": 2, "green": 2, "blue": 2})
    model = CountingOracle()
    info = build(model, [folder], tmp_path / "index", "oracle", batch_size=4, workers=0)
    assert info["count"] == 6 and info["kind"] == "exact" and model.embedded == 6
    hits = Index.open(tmp_path / "index", model).search("a photo of something green", k=2)
    assert [h["path"].split("/")[-2] for h in hits] == ["green", "green"] and hits[0]["score"] == 1.0
    by_image = Index.open(tmp_path / "index", model).search(image("blue"), k=2)
    assert {h["path"].split("/")[-2] for h in by_image} == {"blue"}


def test_rebuild_adds_changes_and_drops_files(tmp_path):
    folder = image_folder(tmp_path / "photos", {"red": 2, "green": 1})
    model = CountingOracle()
    assert build(model, [folder], tmp_path / "index", "oracle", workers=0, precision="fp32")["precision"] == "fp32"
    image("blue").save(folder / "green" / "new.png")
    (folder / "red" / "1.png").unlink()
    time.sleep(0.01)
    image("blue").save(folder / "red" / "0.png")  # changed: now blue
    model.embedded = 0
    info = build(model, [folder], tmp_path / "index", "oracle", workers=0, precision="bf16")
    assert info["count"] == 3 and model.embedded == 2  # the new file and the changed one
    assert info["precision"] == "fp32"  # an index keeps the precision of its first build
    hits = Index.open(tmp_path / "index", model).search("blue", k=2)
    assert sorted(Path(h["path"]).relative_to(folder.resolve()).as_posix() for h in hits) == [
        "green/new.png",
        "red/0.png",
    ]
    model.embedded = 0
    build(model, [folder], tmp_path / "index", "oracle", workers=0)
    assert model.embedded == 0  # nothing changed
    with torch.no_grad():
        model.unused.fill_(1.0)  # the model at the same path, retrained
    assert build(model, [folder], tmp_path / "index", "oracle", workers=0)["count"] == 3 and model.embedded == 3
    with pytest.raises(Exception, match="built with model 'oracle'"):
        build(model, [folder], tmp_path / "index", "another", workers=0)


def colour_png(colour: str) -> bytes:
    data = io.BytesIO()
    image(colour).save(data, format="PNG")
    return data.getvalue()


def test_an_index_of_data_sets_keeps_their_captions_and_reads_tar_members(tmp_path, monkeypatch):
    """A JSONL listing and webdataset shards are indexed like folders, with each image's
    caption; a tar member is read back from its shard for re-ranking and thumbnails."""
    listing = tmp_path / "listed"
    listing.mkdir()
    for colour in ("red", "blue"):
        image(colour).save(listing / f"{colour}.png")
    lines = [{"image": f"{colour}.png", "caption": f"a {colour} square"} for colour in ("red", "blue")]
    (listing / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    write_webdataset(tmp_path / "shards", "train", [("s0", colour_png("green"), {"caption": "a green circle"})])
    info = build(
        CountingOracle(), [listing / "train.jsonl", tmp_path / "shards"], tmp_path / "index", "oracle", workers=0
    )
    assert info["count"] == 3 and info["skipped"] == []
    index = Index.open(tmp_path / "index", CountingOracle())
    (green,) = index.search("green", k=1)
    assert green["caption"] == "a green circle" and green["path"].endswith("train-000000.tar#s0")
    assert np.array_equal(np.asarray(index.image(green["id"])), np.asarray(image("green")))
    (blue,) = index.search("blue", k=1)
    assert blue["caption"] == "a blue square" and blue["path"] == str(listing / "blue.png")
    assert np.array_equal(np.asarray(index.image(blue["id"])), np.asarray(image("blue")))
    with pytest.raises(KeyError):
        index.image(99)
    monkeypatch.setattr("vlp.api.load", lambda source: CountingOracle())  # the model info.json names
    result = CliRunner().invoke(app, ["index", "search", str(tmp_path / "index"), "red", "--top-k", "1"])
    assert result.stdout.strip().endswith("red.png\ta red square"), result.output


def test_a_build_in_small_chunks_equals_a_build_in_one(tmp_path, monkeypatch):
    """Images are listed and checked against the index CHUNK at a time (bounded memory): the
    result, and what a rebuild drops and adds, do not depend on the chunk size."""
    folder = image_folder(tmp_path / "photos", {"red": 3, "green": 2, "blue": 3})
    one = build(CountingOracle(), [folder], tmp_path / "one", "oracle", workers=0, batch_size=2)
    monkeypatch.setattr("vlp.apps.index.CHUNK", 3)
    model = CountingOracle()
    small = build(model, [folder, folder / "red"], tmp_path / "small", "oracle", workers=0, batch_size=2)
    assert small["count"] == one["count"] == 8 and model.embedded == 8  # red given twice, embedded once
    a, b = stored(tmp_path / "one"), stored(tmp_path / "small")
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    (folder / "red" / "0.png").unlink()
    image("red").save(folder / "zz.png")
    model.embedded = 0
    assert build(model, [folder], tmp_path / "small", "oracle", workers=0)["count"] == 8 and model.embedded == 1
    assert str(folder / "red" / "0.png") not in stored(tmp_path / "small")[0]


def test_an_index_built_before_captions_is_brought_up_to_date(tmp_path):
    folder = image_folder(tmp_path / "photos", {"red": 1, "blue": 1})
    build(CountingOracle(), [folder], tmp_path / "index", "oracle", workers=0)
    with sqlite3.connect(tmp_path / "index" / "meta.sqlite") as db:  # the schema of the first release
        db.execute("ALTER TABLE images DROP COLUMN caption")
        db.execute("ALTER TABLE images DROP COLUMN file")
    image("green").save(folder / "new.png")
    assert build(CountingOracle(), [folder], tmp_path / "index", "oracle", workers=0)["count"] == 3
    hits = Index.open(tmp_path / "index", CountingOracle()).search("red", k=1)
    assert hits[0]["caption"] is None and Index.open(tmp_path / "index", CountingOracle()).image(hits[0]["id"])


def test_a_local_model_path_is_stored_absolute(tmp_path, monkeypatch):
    """An index made from `runs/m` opens from any folder, and names the same model either way."""
    folder = image_folder(tmp_path / "photos", {"red": 1})
    (tmp_path / "runs" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    info = build(CountingOracle(), [folder], tmp_path / "index", "runs/m", workers=0)
    assert info["model"] == str((tmp_path / "runs" / "m").resolve())
    assert build(CountingOracle(), [folder], tmp_path / "index", str(tmp_path / "runs" / "m"), workers=0)["count"] == 1


def unusual_files(folder):
    """Files a photo collection holds: broken ones and unusual but valid ones."""
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    png = io.BytesIO()
    image("red", 64).save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[:60])
    Image.new("1", (3000, 3000)).save(folder / "bomb.png")  # 9 M pixels in a few KB
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    image("green").convert("P").save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (20, 10), (0, 0, 255)).save(folder / "rotated.jpg", exif=exif)
    (folder / "notes.txt").write_text("not an image")


def test_broken_files_are_skipped_and_unusual_ones_indexed(tmp_path):
    unusual_files(tmp_path / "photos")
    info = build(CountingOracle(), [tmp_path / "photos"], tmp_path / "index", "oracle", workers=0, max_pixels=1_000_000)
    skipped = {line.split(": ")[0].rsplit("/", 1)[-1]: line for line in info["skipped"]}
    assert sorted(skipped) == ["bomb.png", "corrupt.jpg", "truncated.png", "zero.png"]
    assert "image too large" in skipped["bomb.png"]
    assert info["count"] == 4  # cmyk, sixteen, palette, rotated


def test_decoding_workers_take_only_the_cores_the_encoder_leaves(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert decode_workers(torch.device("cpu")) == 0  # 2 cores, both the encoder's
    assert decode_workers(torch.device("cuda")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert decode_workers(torch.device("cpu")) == 8 and decode_workers(torch.device("cuda")) == 8


def test_hnsw_recall_against_exact_is_measured():
    vectors = torch.nn.functional.normalize(torch.randn(3000, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    index, info = faiss_index(vectors.numpy(), exact_limit=1000)
    assert info["kind"] == "hnsw" and info["recall_at_10"] >= 0.9 and index.ntotal == 3000
    assert faiss_index(vectors[:100].numpy(), exact_limit=1000)[1]["kind"] == "exact"


def stored(index: Path) -> tuple[list[str], np.ndarray]:
    """An index's paths and embeddings, in row id order."""
    db = sqlite3.connect(index / "meta.sqlite")
    paths = [path for (path,) in db.execute("SELECT path FROM images ORDER BY id")]
    return paths, np.concatenate(list(vector_blocks(db, index)))


def test_a_killed_build_resumes_to_the_same_index(tmp_path, shapes_dir):
    run = vlp.save(tiny_clip(shapes_dir), tmp_path / "run")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(240):
        Image.new("RGB", (32, 32), (i, (7 * i) % 256, (13 * i) % 256)).save(folder / f"{i:03d}.png")
    command = [
        sys.executable,
        "-m",
        "vlp.cli",
        "index",
        "build",
        str(run),
        str(folder),
        "--batch-size",
        "16",
        "--workers",
        "1",
    ]
    straight = subprocess.run([*command, "--out", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    victim = subprocess.Popen(
        [*command, "--out", str(tmp_path / "victim")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = tmp_path / "victim" / "embeddings"
    while victim.poll() is None and len(list(shards.glob("*.safetensors"))) < 3:
        time.sleep(0.005)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([*command, "--out", str(tmp_path / "victim")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("straight", "victim"):
        assert (tmp_path / name / "index.faiss").is_file()
        assert not list((tmp_path / name).rglob("*.tmp"))  # no half-written shard or file left
    a, b = stored(tmp_path / "straight"), stored(tmp_path / "victim")
    assert a[0] == b[0] and len(a[0]) == 240 and np.array_equal(a[1], b[1])
    result = CliRunner().invoke(app, ["index", "search", str(tmp_path / "victim"), "a red circle", "--top-k", "3"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3, result.output


def test_search_reranks_the_shortlist_with_itm(tmp_path):
    """A tiny BLIP with random weights: the shortlist comes back re-scored by ITM match
    probabilities, best first; a CLIP has no ITM head to re-rank with."""
    from tests.test_fusion_models import TEXT, model_config
    from vlp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a red circle", "a blue square"], vocab_size=60)
    torch.manual_seed(0)
    config = model_config("blip", text={**TEXT, "vocab_size": tokenizer.vocab_size}, tokens=tokenizer.special_ids())
    blip = vlp.create_model("blip", config, tokenizer=tokenizer).eval()
    folder = image_folder(tmp_path / "photos", {"red": 3, "blue": 3})
    build(blip, [folder], tmp_path / "index", "blip", workers=0)
    index = Index.open(tmp_path / "index", blip)
    plain = index.search("a red circle", k=6)
    reranked = index.search("a red circle", k=4, rerank="itm", shortlist=6)
    assert len(reranked) == 4 and {h["path"] for h in reranked} <= {h["path"] for h in plain}
    scores = [h["score"] for h in reranked]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    with pytest.raises(TypeError, match="needs a text query"):
        index.search(image("red"), k=2, rerank="itm")
