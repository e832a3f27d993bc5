"""Mean ± std over seeds of eval.json metrics, as a Markdown table for docs/results.md.

Runs are laid out as ROOT/<variant>/seed<k>/eval.json (what the experiment scripts write);
a metric is a dotted path into eval.json, e.g. `retrieval.i2t_R@1` or `probe.itm_accuracy`.
`--file` reads another JSON file the scripts keep beside it, such as CapFilt's capfilt.json.

    python experiments/summarize.py runs/albef_ablation retrieval.i2t_R@1 retrieval_itm.i2t_R@1
    python experiments/summarize.py --file capfilt.json experiments/results/capfilt web_removed
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def lookup(results: dict, path: str) -> float | None:
    """The value at a dotted path of an eval.json, or None where a run lacks it."""
    node = results
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarize(root: Path, metrics: list[str], file: str = "eval.json") -> str:
    """One row per variant (sub-folder of `root` holding `file`), one column per metric, plus the
    seed count."""
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(variant.glob(f"seed*/{file}"))]
        if not runs:
            continue
        columns = [cell([v for r in runs if (v := lookup(r, m)) is not None]) for m in metrics]
        lines.append(f"| {variant.name} | {len(runs)} | " + " | ".join(columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder of <variant>/seed<k>/eval.json")
    parser.add_argument("metrics", nargs="+", help="dotted paths into the JSON file")
    parser.add_argument("--file", default="eval.json", help="the JSON file of each seed (default: eval.json)")
    args = parser.parse_args()
    print(summarize(args.root, args.metrics, args.file))


if __name__ == "__main__":
    main()
