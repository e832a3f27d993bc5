"""CapFilt: which captions a known filter keeps, provenance, resume after a kill, and the
command end to end on tiny models."""

import json

import pytest
import torch
import yaml
from conftest import tiny_clip
from typer.testing import CliRunner

from vlp.apps.capfilt import CapFiltOptions, bootstrap, select, summarize
from vlp.cli import app
from vlp.data.formats import open_dataset


@pytest.fixture(scope="module")
def noisy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    args = [
        "data",
        "shapes",
        "--out",
        str(out),
        "--image-size",
        "32",
        "--vocab-size",
        "512",
        "--noise",
        "0.4",
        "--train",
        "40",
        "--val",
        "2",
        "--test",
        "8",
        "--clean",
        "16",
        "--classify",
        "8",
        "--compositional",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_select_by_threshold_and_by_rank():
    candidates = [{"score": s} for s in (0.9, 0.2, 0.5, 0.7)]
    assert select(candidates, CapFiltOptions(threshold=0.5)) == [True, False, True, True]
    assert select(candidates, CapFiltOptions(mode="rank", keep=2)) == [True, False, False, True]
    with pytest.raises(ValueError, match="mode"):
        select(candidates, CapFiltOptions(mode="vote"))


def known_models(dataset):
    """A captioner whose captions carry a number drawn from the part's generator, and a filter
    that scores exactly the noisy web captions low."""
    noisy = {c for i in range(len(dataset)) if dataset.meta(i)["noisy"] for c in dataset.captions(i)}

    def captioner(images, generator):
        return [[f"synthetic {torch.randint(1000, (1,), generator=generator).item()}", "bad synthetic"] for _ in images]

    def scorer(images, candidates):
        return [[0.1 if text in noisy or text.startswith("bad") else 0.9 for text in group] for group in candidates]

    return captioner, scorer, noisy


def test_known_filter_keeps_exactly_the_clean_web_and_good_synthetic_captions(tmp_path, noisy_dir):
    dataset = open_dataset(noisy_dir, split="train")
    captioner, scorer, noisy = known_models(dataset)
    bootstrap(dataset, tmp_path, captioner, scorer, CapFiltOptions(chunk=16, batch_size=8))
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(lines) == len(dataset) and noisy  # every image keeps its synthetic caption
    for line in lines:
        web = dataset.captions(line["source_index"])[0]
        expected = ([] if web in noisy else [web]) + [c for c in line["caption"] if c.startswith("synthetic")]
        assert line["caption"] == expected and len(expected) == (1 if web in noisy else 2)
        assert [c["source"] for c in line["provenance"]] == ["web", "synthetic", "synthetic"]
        assert [c["kept"] for c in line["provenance"]] == [web not in noisy, True, False]
        assert all(set(c) == {"text", "source", "score", "kept"} for c in line["provenance"])
        assert line["noisy"] == (web in noisy) and (tmp_path / line["image"]).is_file()
    stats = summarize(tmp_path)
    assert stats["web_removed"] == sum(line["noisy"] for line in lines) and stats["synthetic_added"] == len(lines)
    assert stats["filter_at_threshold"]["precision"] == 100.0 and stats["filter_at_threshold"]["recall"] == 100.0
    assert stats["removed_by_noise_kind"].pop("clean") == 0.0
    assert set(stats["removed_by_noise_kind"].values()) == {100.0}
    clean_kept = len(lines) - stats["web_removed"]  # true by construction; "synthetic 123" does not parse
    assert stats["truth"]["web_kept_true"] == 100.0 and stats["truth"]["synthetic_true"] == 0.0
    assert stats["truth"]["synthetic_unparsed"] == 2 * len(lines)
    assert stats["truth"]["kept_true"] == pytest.approx(100.0 * clean_kept / (clean_kept + len(lines)))
    assert stats["truth"]["web_true"] < 100.0
    # "bad synthetic" repeats: at most one distinct caption per image, plus it
    assert 0.0 < stats["truth"]["synthetic_distinct"] <= 100.0 * (len(lines) + 1) / (2 * len(lines))
    reread = open_dataset(tmp_path, split="train")  # the output is a data set vlp reads
    assert len(reread) == len(lines) and reread.captions(0) == lines[0]["caption"]


def test_resume_after_a_kill_gives_the_uninterrupted_output(tmp_path, noisy_dir):
    dataset = open_dataset(noisy_dir, split="train")
    captioner, scorer, _ = known_models(dataset)
    options = CapFiltOptions(chunk=16, batch_size=8, seed=3)
    bootstrap(dataset, tmp_path / "straight", captioner, scorer, options)
    bootstrap(dataset, tmp_path / "killed", captioner, scorer, options, stop_after=1)
    assert not (tmp_path / "killed" / "train.jsonl").exists()
    assert len(list((tmp_path / "killed" / "parts").glob("part_*.jsonl"))) == 1
    bootstrap(dataset, tmp_path / "killed", captioner, scorer, options)
    assert (tmp_path / "killed" / "train.jsonl").read_text() == (tmp_path / "straight" / "train.jsonl").read_text()
    with pytest.raises(ValueError, match="other CapFilt options"):
        bootstrap(dataset, tmp_path / "killed", captioner, scorer, CapFiltOptions(chunk=8))


def test_webdataset_output_holds_the_jsonl_output_and_replaces_it(tmp_path, noisy_dir):
    dataset = open_dataset(noisy_dir, split="train")
    captioner, scorer, _ = known_models(dataset)
    options = CapFiltOptions(chunk=16, batch_size=8)
    assert bootstrap(dataset, tmp_path, captioner, scorer, options) == tmp_path / "train.jsonl"
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert bootstrap(dataset, tmp_path, captioner, scorer, options, format="wds") == tmp_path / "train"
    assert not (tmp_path / "train.jsonl").exists() and not (tmp_path / "train.partial").exists()
    shards = open_dataset(tmp_path, split="train")  # found as webdataset: train/*.tar
    assert len(shards) == len(lines) == len(dataset)
    for i, line in enumerate(lines):
        sample = shards[i]
        assert sample.source.startswith(str(tmp_path / "train" / "train-000000.tar#"))
        assert sample.captions == line["caption"]
        assert sample.meta["provenance"] == line["provenance"] and sample.meta["source_index"] == line["source_index"]
        assert sample.image.tobytes() == dataset[line["source_index"]].image.tobytes()
    with pytest.raises(ValueError, match="output format"):
        bootstrap(dataset, tmp_path, captioner, scorer, options, format="parquet")
    source_copy = tmp_path / "source"
    (source_copy / "train").mkdir(parents=True)
    (source_copy / "train" / "train-000000.tar").write_bytes(b"someone's data")
    with pytest.raises(ValueError, match="did not write"):  # a data set CapFilt did not make is left alone
        bootstrap(dataset, source_copy, captioner, scorer, options, format="wds")
    assert (source_copy / "train" / "train-000000.tar").read_bytes() == b"someone's data"


def test_capfilt_command_end_to_end(tmp_path, noisy_dir):
    from tests.test_fusion_models import model_config

    model = model_config("blip")
    model.pop("tokens")
    model["text"].pop("vocab_size")
    config = {
        "recipe": "blip",
        "model": model,
        "data": {"path": str(noisy_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": 2, "warmup": 1, "log_every": 1, "ckpt_every": 2},
    }
    (tmp_path / "blip.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", "blip", "--config", str(tmp_path / "blip.yaml"), "--out", str(tmp_path / "blip"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    args = [
        "capfilt",
        "--init",
        str(tmp_path / "blip"),
        "--data",
        str(noisy_dir),
        "--clean",
        str(noisy_dir),
        "--out",
        str(tmp_path / "boot"),
        "--steps",
        "2",
        "--limit",
        "12",
        "--synthetic",
        "2",
        "--no-progress",
    ]

    def writing_to(out):
        return args[: args.index("--out") + 1] + [str(out)] + args[args.index("--out") + 2 :]

    result = runner.invoke(app, writing_to(noisy_dir))  # refused before any work: the source is not overwritten
    assert result.exit_code == 2 and not (noisy_dir / "captioner").exists(), result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "web captions removed" in result.output and "precision" in result.output
    stats = json.loads((tmp_path / "boot" / "capfilt.json").read_text())
    assert stats["images"] == 12 and stats["synthetic_generated"] == 24
    assert (tmp_path / "boot" / "report.html").read_text().count("<img") == 1
    result = runner.invoke(app, args + ["--format", "wds"])  # run again: everything is reused, same output
    assert result.exit_code == 0 and json.loads((tmp_path / "boot" / "capfilt.json").read_text()) == stats
    assert f"data: {tmp_path / 'boot' / 'train'};" in result.output
    assert len(open_dataset(tmp_path / "boot", "train")) == stats["images_kept"]
    filter_only = writing_to(tmp_path / "filtered")
    filter_only[filter_only.index("--synthetic") + 1] = "0"  # the paper's "filter only" ablation,
    assert runner.invoke(app, filter_only + ["--threshold", "0"]).exit_code == 0  # here keeping all
    lines = [json.loads(line) for line in (tmp_path / "filtered" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all(c["source"] == "web" and c["kept"] for line in lines for c in line["provenance"])
    assert json.loads((tmp_path / "filtered" / "capfilt.json").read_text())["synthetic_generated"] == 0


def test_rank_mode_scores_candidates_with_a_clip_model(shapes_dir):
    """BLIP-2's variant: candidates scored by CLIP similarity, the best `keep` kept."""
    from vlp.apps.capfilt import embedding_scorer
    from vlp.data.transforms import model_images

    model = tiny_clip(shapes_dir)
    dataset = open_dataset(shapes_dir, split="test")
    images = [dataset[0].image, dataset[1].image]
    candidates = [["a red circle", "a blue square", "two shapes"], ["a green triangle"]]
    scores = embedding_scorer(model)(images, candidates)
    with torch.no_grad():
        image_emb = model.encode_image(model_images(model, images))
        tokens = model.tokenizer(candidates[0], style="clip")
        expected = image_emb[0] @ model.encode_text(tokens["input_ids"], tokens["attention_mask"]).T
    assert [len(s) for s in scores] == [3, 1]
    torch.testing.assert_close(torch.tensor(scores[0]), expected, atol=1e-5, rtol=0)
    kept = select([{"score": s} for s in scores[0]], CapFiltOptions(mode="rank", keep=2))
    assert sum(kept) == 2 and not kept[int(torch.tensor(scores[0]).argmin())]


def test_run_from_python_refuses_bad_arguments_first_then_writes_what_the_command_does(
    tmp_path, noisy_dir, monkeypatch
):
    """`run` without the CLI: the command's argument errors as ValueError before any work, then
    the whole run (the fine-tuned models replaced by the known ones, so no training here)."""
    import vlp
    from vlp.apps import capfilt

    def run(out, **kwargs):
        return capfilt.run(tmp_path / "blip", noisy_dir, noisy_dir, out, progress=False, **kwargs)

    for kwargs, message in [
        ({"options": CapFiltOptions(mode="rank")}, "--mode rank needs --ranker"),
        ({"options": CapFiltOptions(method="greedy")}, "--method must be nucleus or beam"),
        ({"format": "parquet"}, "output format"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "boot", **kwargs)
    with pytest.raises(ValueError, match="did not write"):
        run(noisy_dir)
    assert not (tmp_path / "boot").exists() and not (noisy_dir / "captioner").exists()
    captioner, scorer, _ = known_models(open_dataset(noisy_dir, split="train"))
    monkeypatch.setattr(capfilt, "fine_tune", lambda init, clean, out, steps, progress: (out / "c", out / "f"))
    monkeypatch.setattr(vlp, "load", lambda path: path)
    monkeypatch.setattr(capfilt, "model_captioner", lambda model, options: captioner)
    monkeypatch.setattr(capfilt, "itm_scorer", lambda model: scorer)
    stats, written = run(tmp_path / "boot", options=CapFiltOptions(limit=12))
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert written == tmp_path / "boot" / "train.jsonl" and len(lines) == stats["images"] == 12
    assert stats["web_removed"] == sum(line["noisy"] for line in lines) and stats["synthetic_added"] == 12
    assert json.loads((tmp_path / "boot" / "capfilt.json").read_text()) == stats
    assert (tmp_path / "boot" / "report.html").is_file()
    for name in ("tokenizer.json", "info.json"):  # training on the output finds them
        assert (tmp_path / "boot" / name).read_bytes() == (noisy_dir / name).read_bytes()
    summary = capfilt.summary_lines(stats)
    assert len(summary) == 3 and summary[0].startswith(f"{stats['web_removed']} of 12 web captions removed, ")
