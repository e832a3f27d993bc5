"""Unreadable samples are reported by `vlp eval`, and `vlp report` survives a half-written log."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import tiny_clip

from vlp.eval.report import write_report
from vlp.eval.results import metric_rows
from vlp.eval.run import evaluate


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _keys(split_dir: Path) -> list[str]:
    """The sample keys of a split's first shard, in order."""
    names = [name for name, _ in _members(sorted(split_dir.glob("*.tar"))[0])]
    return list(dict.fromkeys(name.split(".", 1)[0] for name in names))


def _rewrite_shard(split_dir: Path, change) -> None:
    """Rewrite the first shard of a split, `change(name, data)` giving each member's new bytes
    (None drops the member)."""
    shard = sorted(split_dir.glob("*.tar"))[0]
    members = _members(shard)
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def damaged_shapes(tmp_path, shapes_dir):
    """The shapes world with, in the test split, one corrupt image and one image without its
    caption file, and in the classify split one corrupt image; returns (path, damaged keys)."""
    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data)
    corrupt, uncaptioned = _keys(data / "test")[2], _keys(data / "test")[5]
    _rewrite_shard(
        data / "test",
        lambda name, data: (
            b"not a png" if name == f"{corrupt}.png" else None if name == f"{uncaptioned}.json" else data
        ),
    )
    classify_key = _keys(data / "classify")[1]
    _rewrite_shard(data / "classify", lambda name, data: b"\x89PNG broken" if name == f"{classify_key}.png" else data)
    return data, {"corrupt": corrupt, "uncaptioned": uncaptioned, "classify": classify_key}


def test_eval_reports_unreadable_samples_and_scores_the_rest(tmp_path, damaged_shapes, capsys):
    data, damaged = damaged_shapes
    run = tmp_path / "run"
    run.mkdir()
    results = evaluate(tiny_clip(data), data, run, tasks=["zeroshot", "retrieval", "probe"], examples=100)

    saved = json.loads((run / "eval.json").read_text())
    assert saved["skipped"] == results["skipped"]
    test = saved["skipped"]["test"]
    assert test["count"] == 2  # counted once, though retrieval and the probe both read the split
    assert any(damaged["corrupt"] in s and "corrupt image" in s for s in test["samples"])
    assert any(damaged["uncaptioned"] in s for s in test["samples"])
    assert saved["skipped"]["classify"]["count"] == 1
    assert damaged["classify"] in saved["skipped"]["classify"]["samples"][0]
    assert saved["skipped"]["compositional"] == {"count": 0, "samples": []}

    # The metrics were computed on the 22 readable test images, none of the damaged ones.
    shown = json.loads((run / "examples.json").read_text())
    assert len(shown) == 22 and 0 <= saved["retrieval"]["i2t_R@1"] <= 100
    assert {"shape_top1", "color_top1", "color_shape_top1"} <= set(saved["zeroshot"])
    assert 0 <= saved["probe"]["accuracy"] <= 100

    printed = capsys.readouterr().out
    assert printed.count("test split:") == 1 and printed.count("classify split:") == 1
    assert damaged["corrupt"] in printed
    assert "compositional split" not in printed  # nothing to say about a clean split

    assert all(task != "skipped" for task, _, _ in metric_rows(results))
    html = write_report(run).read_text()
    assert "per split: test 2, classify 1, compositional 0" in html


def test_report_survives_a_truncated_metrics_log(tmp_path):
    records = [
        {"step": 0, "event": "start"},
        {"step": 1, "loss": 2.0, "lr": 1e-3},
        {"step": 2, "loss": 1.5, "lr": 1e-3},
        {"step": 3, "loss": 1.2},
    ]  # the last lacks lr
    lines = [json.dumps(r) for r in records] + ["[1, 2]", '{"step": 4, "loss": 1.1, "l']  # a kill mid-write
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    html = write_report(tmp_path).read_text()
    assert "3 unreadable lines of metrics.jsonl" in html
    assert "2 steps, final loss 1.5000" in html and "training curves" in html
