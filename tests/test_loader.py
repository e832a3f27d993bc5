import json

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, torchrun_train
from PIL import Image

from vlp.config import load_run_config
from vlp.data.loader import StreamSampler
from vlp.data.sample import DataError
from vlp.train.trainer import Trainer


def test_stream_is_a_pure_function_of_position():
    full = iter(StreamSampler(10, 4, seed=3))
    batches = [next(full) for _ in range(5)]  # 20 samples = 2 epochs
    resumed = iter(StreamSampler(10, 4, seed=3, start=8))
    assert [next(resumed) for _ in range(3)] == batches[2:]
    for epoch in (0, 1):
        keys = [k for b in batches for k in b if k[0] == epoch]
        assert sorted(i for _, i in keys) == list(range(10))  # each epoch visits every sample once
    first_epoch = [i for b in batches for e, i in b if e == 0]
    second_epoch = [i for b in batches for e, i in b if e == 1]
    assert first_epoch != second_epoch  # reshuffled


def test_ranks_split_each_global_batch():
    single = next(iter(StreamSampler(12, 6, seed=0)))
    parts = [next(iter(StreamSampler(12, 6, seed=0, rank=r, world_size=2))) for r in (0, 1)]
    assert parts[0] + parts[1] == single
    with pytest.raises(ValueError, match="divisible"):
        StreamSampler(12, 5, seed=0, world_size=2)


def write_jsonl_data(root, n, corrupt=()):
    lines = []
    for i in range(n):
        path = root / f"{i}.png"
        if i in corrupt:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (32, 32), (i * 9 % 255, 40, 200)).save(path)
        lines.append(json.dumps({"image": path.name, "caption": f"a picture number {i}"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")


def config_for(tmp_path, **train):
    cfg = {
        **TINY_CONFIG,
        "data": {**TINY_CONFIG["data"], "path": str(tmp_path / "data"), "batch_size": 8},
        "train": {**TINY_CONFIG["train"], **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_run_config("clip", path)


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl_data(tmp_path / "data", 20, corrupt={7})
    cfg = config_for(tmp_path, steps=4, ckpt_every=4)  # 32 samples: epoch 0 ends inside the run
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e.get("event") == "skipped"]
    # Epoch 0 is complete; the partial epoch 1 is reported at the end of training if it met 7.png.
    assert skips[0]["epoch"] == 0 and skips[0]["count"] == 1
    assert [s["epoch"] for s in skips] in ([0], [0, 1])
    assert all(s["count"] == 1 and "7.png" in s["samples"][0] for s in skips)
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # trained from the captions


def skip_counts(run_dir):
    """{epoch or "listing": skipped samples} summed over metrics.jsonl's skip records."""
    counts = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "skipped":
            key = record.get("epoch", record.get("phase"))
            counts[key] = counts.get(key, 0) + record["count"]
    return counts


def test_skips_count_in_the_epoch_of_their_sample(tmp_path):
    """A batch that spans two epochs: its unreadable samples of the first epoch count there."""
    (tmp_path / "data").mkdir()
    sampler = StreamSampler(10, 4, seed=0)
    last_of_epoch_0 = {sampler.key(8)[1], sampler.key(9)[1]}  # drawn in the batch of positions 8-11
    write_jsonl_data(tmp_path / "data", 10, corrupt=last_of_epoch_0)
    cfg = config_for(tmp_path, steps=5, ckpt_every=5)  # 20 samples: exactly two epochs
    cfg.data.batch_size = 4
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert skip_counts(tmp_path / "run") == {0: 2, 1: 2}


def test_a_batch_with_no_readable_sample_is_skipped(tmp_path):
    """Batch size 1 and an unreadable image: its batches are skipped and counted, not fatal."""
    (tmp_path / "data").mkdir()
    write_jsonl_data(tmp_path / "data", 4, corrupt={2})
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write('{"image": "missing.png", "caption": "gone"}\n')
    cfg = config_for(tmp_path, steps=6, ckpt_every=3)
    cfg.data.batch_size = 1
    values = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert values["step"] == 6
    counts = skip_counts(tmp_path / "run")
    assert counts.pop("listing") == 1  # the missing file, found while reading the listing
    assert sum(counts.values()) == 2  # 2.png, met in both epochs that 6 readable samples take


def test_ddp_ranks_report_their_skips_and_drop_a_batch_together(tmp_path):
    """Under torchrun every rank's skips reach metrics.jsonl (only rank 0 writes it), and a
    global batch in which one rank read nothing is dropped by both ranks, its samples counted."""
    (tmp_path / "data").mkdir()
    sampler = StreamSampler(8, 4, seed=0)
    rank_1_first = {sampler.key(2)[1], sampler.key(3)[1]}  # rank 1's half of the first global batch
    write_jsonl_data(tmp_path / "data", 8, corrupt=rank_1_first)
    (tmp_path / "ddp.yaml").write_text(
        yaml.safe_dump(
            {
                **TINY_CONFIG,
                "data": {**TINY_CONFIG["data"], "path": str(tmp_path / "data"), "batch_size": 2},
                "train": {**TINY_CONFIG["train"], "steps": 4, "ckpt_every": 4},
            }
        )
    )
    result = torchrun_train(
        "clip", "--config", str(tmp_path / "ddp.yaml"), "--out", str(tmp_path / "run"), "--no-progress"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_epoch = [s for r in records if r.get("event") == "skipped" and r.get("epoch") == 0 for s in r["samples"]]
    assert sorted(s.split(":")[0] for s in first_epoch if "corrupt image" in s) == sorted(
        str(tmp_path / "data" / f"{i}.png") for i in rank_1_first
    )
    assert sum("dropped batch" in s for s in first_epoch) == 2  # rank 0's two readable samples
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_training_confines_listed_images_to_data_image_root(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl_data(tmp_path / "data", 4)
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write('{"image": "../outside.png", "caption": "a picture from elsewhere"}\n')
    cfg = config_for(tmp_path, steps=1)
    confined = Trainer(cfg, tmp_path / "confined", progress=False)
    confined.close()
    assert [s.reason.split(":")[0] for s in confined.dataset.skipped] == ["path outside data set"]
    cfg.data.image_root, cfg.data.max_pixels = str(tmp_path), 32 * 32 - 1
    widened = Trainer(cfg, tmp_path / "widened", progress=False)
    widened.close()
    assert len(widened.dataset) == 5 and widened.dataset.skipped == []
    assert widened.dataset[0].reason.startswith("image too large: 32x32 pixels")


def test_strict_mode_names_the_corrupt_file(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl_data(tmp_path / "data", 20, corrupt=set(range(20)) - {3})
    cfg = config_for(tmp_path, steps=4)
    cfg.data.strict = True
    with pytest.raises(DataError, match=r"\d+\.png"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()


def test_model_output_independent_of_padding(tmp_path):
    """EOS pooling with a causal mask: right padding never changes a caption's embedding."""
    from vlp.models import create_model

    torch.manual_seed(0)
    model = create_model("clip", {**TINY_CONFIG["model"], "text": {**TINY_CONFIG["model"]["text"], "vocab_size": 40}})
    ids = torch.randint(9, 40, (1, 6))
    short = model.encode_text(ids, torch.ones(1, 6, dtype=torch.long))
    padded = model.encode_text(
        torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
        torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long(),
    )
    torch.testing.assert_close(short, padded)


def test_text_only_recipes_get_no_images(shapes_dir):
    """Without an image transform (text-only recipes such as caption_lm) items and batches carry
    no image: nothing is decoded for them."""
    from vlp.data.formats import open_dataset
    from vlp.data.loader import Collator, TrainSet
    from vlp.data.tokenizer import Tokenizer

    base = open_dataset(shapes_dir, split="train")
    items = [TrainSet(base, None, seed=0)[(0, i)] for i in range(4)]
    assert all("image" not in item and item["caption"] in base.captions(i) for i, item in enumerate(items))
    batch = Collator(Tokenizer.load(shapes_dir), 32, "clip")(items)
    assert "images" not in batch and batch["input_ids"].shape[0] == 4


def test_caption_and_qa_text_mixes_captions_and_written_questions(shapes_dir):
    """data.text=caption+qa (the caption LM's pretraining): each item is one of its captions or
    one of its question-answer pairs written as BLIP-2's VQA prompt and the answer, the same
    every time it is drawn."""
    from vlp.data.formats import open_dataset
    from vlp.data.loader import TrainSet
    from vlp.prompts import QA_PROMPT

    base = open_dataset(shapes_dir, split="train")
    mixed = TrainSet(base, None, seed=0, text="caption+qa")
    kinds = []
    for i in range(len(base)):
        text = mixed[(0, i)]["caption"]
        written = {f"{QA_PROMPT.format(qa['question'])} {qa['answer']}" for qa in base[i].meta["qa"]}
        assert text in written or text in base.captions(i)
        assert mixed[(0, i)]["caption"] == text
        kinds.append(text in written)
    assert 0 < sum(kinds) < len(kinds)
