"""The results of an evaluation: the table printed and shown in the report, and the summary
of the samples that could not be read."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlp.data.formats import format_skips
from vlp.data.sample import Skipped

console = Console()
SKIPS_LISTED = 100  # eval.json names the first this many skipped samples of each split


def report_skips(skipped: dict[str, list[Skipped]]) -> dict[str, dict[str, Any]]:
    """Print each split's skips (once, however many tasks read the split) and return eval.json's
    "skipped": {split: {"count": n, "samples": ["source: reason", ... the first SKIPS_LISTED]}}."""
    summary = {}
    for split, skips in skipped.items():
        distinct = list({s.source: s for s in skips}.values())  # each sample once
        if distinct:
            console.print(f"[yellow]{split} split: {escape(format_skips(distinct))}")
        summary[split] = {
            "count": len(distinct),
            "samples": [f"{s.source}: {s.reason}" for s in distinct[:SKIPS_LISTED]],
        }
    return summary


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(task, metric, formatted value) of every result; lists (e.g. skipped metrics) joined.
    The "skipped" samples are not metrics: `report_skips` prints them."""

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return "; ".join(map(str, value)) if isinstance(value, list) else str(value)

    return [
        (task, name, show(value))
        for task, metrics in results.items()
        if isinstance(metrics, dict) and task != "skipped"
        for name, value in metrics.items()
        if value != []
    ]


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title="vlp eval")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in metric_rows(results):
        table.add_row(*row)
    return table
