import json

from conftest import torchrun_train
from typer.testing import CliRunner

from vlp.cli import app

runner = CliRunner()


def test_help_on_every_command():
    for args in ([], ["data", "shapes"], ["tokenizer", "train"], ["train"], ["eval"], ["report"]):
        result = runner.invoke(app, args + ["--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_train_eval_report_end_to_end(tmp_path, tiny_config, shapes_dir):
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "clip",
            "--config",
            str(tiny_config),
            "--out",
            str(run),
            "--steps",
            "4",
            "--no-progress",
            "train.ckpt_every=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    results = json.loads((run / "eval.json").read_text())
    metrics = ("top1", "top5", "mean_per_class_recall")
    assert set(results["zeroshot"]) == {f"{task}_{m}" for task in ("shape", "color", "color_shape") for m in metrics}
    assert 0 <= results["retrieval"]["i2t_R@1"] <= results["retrieval"]["i2t_R@5"] <= 100
    assert 0 <= results["probe"]["accuracy"] <= 100
    html = (run / "report.html").read_text()
    assert "training loss" in html or "data:image/png" in html
    assert html.count('class="card"') == len(json.loads((run / "examples.json").read_text())) > 0


def test_bad_override_names_the_key(tmp_path, tiny_config):
    result = runner.invoke(
        app, ["train", "clip", "--config", str(tiny_config), "--out", str(tmp_path / "r"), "train.lrr=0.1"]
    )
    assert result.exit_code != 0
    assert "train.lrr" in str(result.exception)


def test_tokenizer_train_command(tmp_path, shapes_dir):
    result = runner.invoke(
        app, ["tokenizer", "train", str(shapes_dir), "--out", str(tmp_path / "tok.json"), "--vocab-size", "300"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tok.json").is_file()


def test_torchrun_two_processes(tmp_path, tiny_config):
    """The same entry point under torchrun (gloo on CPU) trains and checkpoints once."""
    run = tmp_path / "ddp"
    result = torchrun_train("clip", "--config", str(tiny_config), "--out", str(run), "--steps", "3", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["start"]  # only rank 0 logs
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["samples_per_s"] > 0
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
