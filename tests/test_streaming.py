"""Streaming webdataset shards (vlp.data.streaming): every sample once per epoch over ranks and
workers, exact mid-epoch resume for any worker count, resampling, mixing, skips, and a
training run on streamed shards that resumes exactly."""

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, torchrun_train
from PIL import Image
from test_loader import skip_counts
from test_train import final_weights
from torch.utils.data import DataLoader

from vlp.config import ConfigError, DataConfig, load_run_config
from vlp.data.formats import read_webdataset, write_webdataset
from vlp.data.streaming import SHARD_INDEX, ShardBatches, ShardStream, resolve_source
from vlp.train.trainer import Trainer


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 255, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, prefix, n, shard_size=7):
    """n samples "<prefix>0000", ... in shards of `shard_size` (the last one shorter)."""
    samples = ((f"{prefix}{i:04d}", png(i), {"caption": f"{prefix} number {i}"}) for i in range(n))
    write_webdataset(folder, prefix, samples, shard_size=shard_size)
    return resolve_source(str(folder), None)


class Keys:
    """A TrainSet stand-in whose items are the samples' "shard#key": what the stream read."""

    def __init__(self, stream):
        self.base = stream

    def __getitem__(self, key):
        epoch, position = key
        return {"epoch": epoch, "key": self.base[position].source.rsplit("/", 1)[-1]}


def batches(stream, global_batch, start, rank, world_size, workers, n):
    """The first n batches of a rank's DataLoader, as lists of sample keys."""
    loader = DataLoader(
        ShardBatches(Keys(stream), global_batch, start, rank, world_size),
        batch_size=None,
        collate_fn=lambda items: [item["key"] for item in items],
        num_workers=workers,
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """75 samples in 11 shards (10 of 7, one of 5)."""
    return write_shards(tmp_path_factory.mktemp("wds"), "a", 75)


def test_two_ranks_two_workers_read_every_sample_once_per_epoch(shards):
    stream = ShardStream([(shards, 1.0)], seed=3)
    assert len(stream) == 75 and len(shards) == 11
    n = 15  # 15 global batches of 10: exactly two epochs
    ranks = [batches(stream, 10, 0, rank, 2, workers=2, n=n) for rank in (0, 1)]
    drawn = [key for b in range(n) for rank in (0, 1) for key in ranks[rank][b]]
    assert drawn == [stream.key(p).rsplit("/", 1)[-1] for p in range(150)]  # the stream, in order
    everything = sorted(f"a-{i // 7:06d}.tar#a{i:04d}" for i in range(75))
    assert sorted(drawn[:75]) == everything and sorted(drawn[75:]) == everything
    assert drawn[:75] != drawn[75:]  # each epoch its own shard order
    index = json.loads((Path(shards[0]).parent / SHARD_INDEX).read_text())
    assert index["a-000010.tar"]["samples"] == 5  # counted once, kept beside the shards


def sources_for(mode, shards, tmp_path_factory):
    if mode == "mixed":
        other = write_shards(tmp_path_factory.mktemp("wds_b"), "b", 20, shard_size=6)
        return [(shards, 1.0), (other, 2.0)]
    return [(shards, 1.0)]


@pytest.mark.parametrize("mode", ["plain", "resampled", "mixed"])
def test_mid_epoch_resume_gives_the_same_batches_for_any_worker_count(mode, shards, tmp_path_factory):
    sources = sources_for(mode, shards, tmp_path_factory)
    stream = ShardStream(sources, seed=5, resampled=mode == "resampled", samples_per_epoch=60)
    straight = batches(stream, 6, 0, rank=1, world_size=2, workers=0, n=16)  # into the second epoch
    for workers in (0, 1, 2):
        resumed_stream = ShardStream(sources, seed=5, resampled=mode == "resampled", samples_per_epoch=60)
        resumed = batches(resumed_stream, 6, 7 * 6, rank=1, world_size=2, workers=workers, n=9)
        assert resumed == straight[7:], workers


def test_resampled_epochs_are_samples_and_reproducible(shards):
    stream = ShardStream([(shards, 1.0)], seed=1, resampled=True, samples_per_epoch=40)
    assert len(stream) == 40 and stream.epoch(39) == 0 and stream.epoch(40) == 1
    keys = [stream.key(p) for p in range(300)]
    assert keys == [ShardStream([(shards, 1.0)], seed=1, resampled=True).key(p) for p in range(300)]
    assert keys != [ShardStream([(shards, 1.0)], seed=2, resampled=True).key(p) for p in range(300)]
    source = stream.sources[0]
    source.locate(20_000)  # draws shards up to sample 20,000 (no shard is read)
    assert len(set(source._draws[:11])) < 11  # with replacement: some shard drawn twice in 11 draws
    per_shard = Counter(source._draws)
    assert set(per_shard) == set(range(11)) and min(per_shard.values()) > len(source._draws) / 11 / 2


def test_mixing_honours_weights_and_is_deterministic(shards, tmp_path):
    other = write_shards(tmp_path / "b", "b", 20, shard_size=6)
    stream = ShardStream([(shards, 3.0), (other, 1.0)], seed=0)
    assert len(stream) == 95  # default epoch: the samples of all shards
    located = [stream.source_of(p) for p in range(10 * 1024)]
    assert Counter(s for s, _ in located[:1024]) == {0: 768, 1: 256}  # exact in every block of 1024
    assert Counter(s for s, _ in located) == {0: 7680, 1: 2560}
    for source in (0, 1):  # each source is read as its own stream, in order
        assert [q for s, q in located if s == source] == list(range(7680 if source == 0 else 2560))
    keys = [stream.key(p).rsplit("#", 1)[-1] for p in range(300)]
    assert keys == [ShardStream([(shards, 3.0), (other, 1.0)], seed=0).key(p).rsplit("#", 1)[-1] for p in range(300)]
    assert keys != [ShardStream([(shards, 3.0), (other, 1.0)], seed=1).key(p).rsplit("#", 1)[-1] for p in range(300)]
    b_keys = [k for k in keys if k[0] == "b"]  # passes over b's 20 samples, each once per pass
    assert len(b_keys) >= 60 and all(
        sorted(b_keys[20 * i : 20 * (i + 1)]) == [f"b{j:04d}" for j in range(20)] for i in range(3)
    )


def write_damaged(folder):
    """4 shards of 5: a corrupt image in shard 0, shard 2 truncated after 2 samples and a half,
    shard 3 not a tar at all."""
    samples = [(f"s{i:04d}", b"not a png" if i == 3 else png(i), {"caption": f"shape number {i}"}) for i in range(20)]
    write_webdataset(folder, "d", samples, shard_size=5)
    shard_2 = folder / "d-000002.tar"
    members = shard_2.read_bytes()
    cut = members.index(b"s0012.png")  # the header of sample 12's image (the third)
    shard_2.write_bytes(members[: cut + 700])  # header and part of the data
    (folder / "d-000003.tar").write_bytes(b"garbage" * 100)


def test_damaged_shards_and_samples_are_counted_skips(tmp_path):
    write_damaged(tmp_path)
    stream = ShardStream([(resolve_source(str(tmp_path), None), 1.0)], seed=0)
    assert len(stream) == 5 + 5 + 2  # shard 2 keeps its two whole samples, shard 3 none
    assert sorted(s.source.rsplit("/", 1)[-1] for s in stream.skipped) == ["d-000002.tar", "d-000003.tar"]
    assert all(s.reason.startswith("corrupt shard:") for s in stream.skipped)
    items = [stream[p] for p in range(24)]  # two epochs
    bad = [item for item in items if not hasattr(item, "image")]
    assert [b.source.rsplit("/", 1)[-1] for b in bad] == ["d-000000.tar#s0003"] * 2
    assert bad[0].reason.startswith("corrupt image")
    with pytest.raises(Exception, match="corrupt shard"):
        ShardStream([(resolve_source(str(tmp_path), None), 1.0)], strict=True)


def test_training_counts_streamed_skips(tmp_path):
    write_damaged(tmp_path / "data")
    config = {
        **TINY_CONFIG,
        "data": {**TINY_CONFIG["data"], "path": str(tmp_path / "data"), "batch_size": 4, "streaming": True},
        "train": {**TINY_CONFIG["train"], "steps": 6, "ckpt_every": 6},  # 24 samples: two epochs of 12
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_run_config("clip", tmp_path / "cfg.yaml")
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert skip_counts(tmp_path / "run") == {"listing": 2, 0: 1, 1: 1}
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # trained on the streamed captions


def test_streaming_keys_need_streaming():
    with pytest.raises(ConfigError, match="data.resampled needs data.streaming"):
        DataConfig(resampled=True)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight"):
        DataConfig(streaming=True, sources=[{"path": "a"}, {"path": "b", "weight": -1}])
    with pytest.raises(ConfigError, match="data.samples_per_epoch"):
        DataConfig(streaming=True, samples_per_epoch=0)


def test_resume_on_streamed_shards_is_exact(tmp_path, shapes_dir):
    """Two mixed, resampled sources of the shapes world's training samples, re-sharded by 10;
    killed after 3 steps and resumed with two DataLoader workers: the same final weights."""
    shapes = read_webdataset(shapes_dir / "train")
    samples = [(f"x{i:04d}", shapes.image_bytes(i), {"caption": shapes.captions(i)}) for i in range(len(shapes))]
    write_webdataset(tmp_path / "a", "a", samples[:60], shard_size=10)
    write_webdataset(tmp_path / "b", "b", samples[60:], shard_size=10)
    data = {
        "path": str(shapes_dir),  # its tokenizer.json
        "streaming": True,
        "resampled": True,
        "samples_per_epoch": 40,
        "sources": [{"path": str(tmp_path / "a"), "weight": 2.0}, {"path": str(tmp_path / "b")}],
    }
    config = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], **data}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    cfg = load_run_config("clip", tmp_path / "cfg.yaml")
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    Trainer(cfg, tmp_path / "resumed", progress=False).fit(stop_at=3)
    resumed_cfg = load_run_config("clip", tmp_path / "cfg.yaml", ["data.workers=2"])
    Trainer(resumed_cfg, tmp_path / "resumed", resume=True, progress=False).fit()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    other = load_run_config("clip", tmp_path / "cfg.yaml", ["train.seed=1"])
    Trainer(other, tmp_path / "other", progress=False).fit()  # the comparison can fail
    assert any(not torch.equal(straight[n], final_weights(tmp_path / "other")[n]) for n in straight)


@pytest.mark.slow  # about 30 s: torchrun and 2 x 2 worker processes
def test_ddp_ranks_stream_with_workers_and_report_skips(tmp_path):
    """2 gloo ranks x 2 DataLoader workers on the damaged shards: the main process counts the
    shards while the other waits, and each epoch's corrupt sample is reported once."""
    write_damaged(tmp_path / "data")
    config = {
        **TINY_CONFIG,
        "data": {**TINY_CONFIG["data"], "path": str(tmp_path / "data"), "batch_size": 2, "streaming": True},
        "train": {**TINY_CONFIG["train"], "steps": 6, "ckpt_every": 6},  # 24 samples: two epochs of 12
    }
    config["data"]["workers"] = 2
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    tokenizer = tmp_path / "data" / "tokenizer.json"
    Trainer(load_run_config("clip", tmp_path / "ddp.yaml"), tmp_path / "first", progress=False).fit(stop_at=1)
    (tmp_path / "first" / "tokenizer.json").rename(tokenizer)  # the ranks load it, not train it
    result = torchrun_train(
        "clip", "--config", str(tmp_path / "ddp.yaml"), "--out", str(tmp_path / "run"), "--no-progress"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert skip_counts(tmp_path / "run") == {"listing": 2, 0: 1, 1: 1}
