"""A self-contained HTML report of a run: training curves, the eval table, retrieval examples."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from vlp.eval.results import metric_rows  # noqa: E402
from vlp.train.rundir import parse_record  # noqa: E402


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


PLOTTED = ("step", "loss", "lr")  # the fields of a training record the curves need


def _read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The training records of metrics.jsonl (those with a loss) and how many lines were
    unreadable: not a JSON object (a run killed mid-write leaves half a line), or a training
    record without a number for every PLOTTED field. Event records are not training records."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        record = parse_record(line)
        if record is None or ("loss" in record and not _plottable(record)):
            unreadable += 1
        elif "loss" in record:
            records.append(record)
    return records, unreadable


def _plottable(record: dict[str, Any]) -> bool:
    return all(isinstance(record.get(key), (int, float)) for key in PLOTTED)


def _curves(records: list[dict[str, Any]]) -> str:
    """Loss and learning-rate curves as an inline PNG."""
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(title="training loss", xlabel="step", yscale="log")
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set(title="learning rate", xlabel="step")
    return figure_html(fig, "training curves")


def figure_html(fig: plt.Figure, alt: str) -> str:
    """A matplotlib figure as an inline <img> (the figure is closed)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="{html.escape(alt)}" src="{_png_data_uri(buffer.getvalue())}">'


def _eval_table(results: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(task)}</td><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>"
        for task, name, value in metric_rows(results)
    )
    return f"{_skip_line(results)}<table><tr><th>task</th><th>metric</th><th>value</th></tr>{rows}</table>"


def _skip_line(results: dict[str, Any]) -> str:
    """One line with eval.json's counts of unreadable samples per split (older files have none)."""
    skipped = results.get("skipped")
    if not skipped:
        return ""
    counts = ", ".join(f"{html.escape(split)} {entry['count']}" for split, entry in skipped.items())
    return f"<p>Unreadable samples left out of the metrics, per split: {counts} (listed in eval.json).</p>"


def _examples(run_dir: Path, examples: list[dict[str, Any]]) -> str:
    cards = []
    for example in examples:
        image = _png_data_uri((run_dir / example["image"]).read_bytes())
        items = "".join(
            f'<li class="{"hit" if t["correct"] else ""}">{html.escape(t["caption"])}'
            f"{' &#10003;' if t['correct'] else ''}</li>"
            for t in example["top5"]
        )
        truth = html.escape(example["truth"][0])
        generated = (
            f"<div class=truth>generated: {html.escape(example['generated'])}</div>"
            if example.get("generated") is not None
            else ""
        )
        cards.append(
            f'<div class="card"><img src="{image}" width="128" height="128">'
            f"<div><div class=truth>true: {truth}</div>{generated}<ol>{items}</ol></div></div>"
        )
    return "".join(cards)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
.card{display:flex;gap:1em;margin:1em 0;align-items:flex-start}.card img{image-rendering:pixelated}
.hit{color:#070;font-weight:bold}.truth{color:#555}"""


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` from metrics.jsonl, eval.json and examples.json."""
    run_dir = Path(run_dir)
    parts = [f"<h1>vlp run: {html.escape(run_dir.name)}</h1>"]
    records, unreadable = _read_metrics(run_dir)
    if records or unreadable:
        parts.append("<h2>Training</h2>")
    if unreadable:
        parts.append(
            f"<p>{unreadable} unreadable line{'s' if unreadable != 1 else ''} of metrics.jsonl left out "
            "(not JSON, or a training record without step, loss or lr).</p>"
        )
    if records:
        last = records[-1]
        parts += [
            f"<p>{last['step']} steps, final loss {last['loss']:.4f}, "
            f"{last.get('samples_per_s', 0):.0f} samples/s at the end.</p>",
            _curves(records),
        ]
    if (run_dir / "eval.json").is_file():
        parts += ["<h2>Evaluation</h2>", _eval_table(json.loads((run_dir / "eval.json").read_text()))]
    if (run_dir / "examples.json").is_file():
        parts += [
            "<h2>Retrieval examples</h2><p>Top-5 captions per test image; a check marks a caption of that image.</p>",
            _examples(run_dir, json.loads((run_dir / "examples.json").read_text())),
        ]
    out = run_dir / "report.html"
    out.write_text(
        f"<!doctype html><meta charset=utf-8><title>vlp report</title><style>{STYLE}</style>{''.join(parts)}"
    )
    return out
