"""`vlp eval RUN`: the fixed evaluation protocols on a data set written by `vlp data shapes`.

Tasks: zeroshot (the "classify" split: shape, colour, colour+shape with prompt ensembles),
retrieval (the "test" split, and "compositional" where present; recipes with an ITM head also
re-rank the ITC shortlist), probe (swap pairs of the test split), caption (recipes with a
decoder: BLEU-4/CIDEr/METEOR on the test split), vqa (recipes that answer questions: accuracy
per question type). Results go to `RUN/eval.json`, retrieval
examples to `RUN/examples.json`.

This module chooses and runs the protocols; each protocol lives in its own module (retrieval,
probe, captioning, zeroshot, vqa), embedding and ITM scoring in `vlp.eval.encode` (what the
applications use too), the results table and the skip summary in `vlp.eval.results`.

Metrics are computed on the samples that could be read. Those that could not (left out of a
split's listing, or an image that does not decode) are printed once per split with
`format_skips` and recorded in eval.json under "skipped": for every split read,
`{"count": n, "samples": ["source: reason", ...]}` (the first 100), the shape of the trainer's
"skipped" records in metrics.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.data.formats import CaptionDataset, class_labels, format_skips, open_dataset
from vlp.data.sample import DataError, Skipped
from vlp.eval.captioning import DEFAULT_DECODING, captioning
from vlp.eval.probe import probe
from vlp.eval.results import console, report_skips
from vlp.eval.retrieval import retrieval
from vlp.eval.vqa import vqa
from vlp.eval.zeroshot import zeroshot
from vlp.models.recipe import Recipe
from vlp.train.board import add_scalars, open_board

TASKS = ("zeroshot", "retrieval", "probe", "caption", "vqa")


def evaluate(
    model: Recipe,
    data: Path,
    run_dir: Path | None = None,
    tasks: Iterable[str] | None = None,
    examples: int = 8,
    k_test: int = 16,
    decoding: dict[str, Any] | None = None,
    split: str | None = None,
    classes: list[str] | None = None,
    templates: list[str] | None = None,
    label_key: str | None = None,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """Run the chosen protocols on `data`; write eval.json (and examples.json) into `run_dir`.

    `data` is the shapes world (its info.json names the splits, classes and templates) or any
    data set `open_dataset` reads: a directory, a split of it (`split`), or a file (COCO-Karpathy
    JSON: `split` defaults to "test"). `classes` and `templates` give zero-shot classification
    what the data does not hold (else its `classnames.txt` / templates file, its class folders,
    vlp's default templates); `label_key` names the label column of a CSV or JSONL set;
    `image_root` the folder its listed images lie in (Flickr30k's JSON names only file names).
    Default tasks: those the recipe supports that the data allows.
    """
    data = Path(data)
    unknown = set(tasks or ()) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    shapes = data.is_dir() and (data / "info.json").is_file() and split is None and classes is None
    plan = _shapes_plan(data) if shapes else _data_plan(data, split, classes, templates, label_key, image_root)
    tasks = _chosen_tasks(model, tasks, plan)
    results: dict[str, Any] = {"data": str(data)}
    shown: list = []
    main = plan.open(plan.main)
    if "zeroshot" in tasks:
        labelled = plan.open(plan.labelled)
        label_sets = plan.label_sets(labelled)
        results["zeroshot"] = zeroshot(model, labelled, label_sets, plan.templates, plan.skips(plan.labelled))
    if "retrieval" in tasks:
        results["retrieval"], reranked, shown = retrieval(model, main, examples, k_test, plan.skips(plan.main))
        if reranked is not None:
            results["retrieval_itm"] = reranked
        if plan.compositional:
            compositional = plan.open(plan.compositional)
            results["retrieval_compositional"] = retrieval(
                model, compositional, skipped=plan.skips(plan.compositional)
            )[0]
    if "probe" in tasks:
        results["probe"] = probe(model, main, plan.skips(plan.main))
    if "vqa" in tasks:
        results["vqa"] = vqa(model, main, skipped=plan.skips(plan.main))
    if "caption" in tasks:
        results["caption"], generated = captioning(
            model, main, decoding or DEFAULT_DECODING, skipped=plan.skips(plan.main)
        )
        for example in shown:
            example["generated"] = generated.get(example["index"])
    results["skipped"] = report_skips(plan.skipped)
    if run_dir is not None:
        (Path(run_dir) / "eval.json").write_text(json.dumps(results, indent=2))
        _save_examples(Path(run_dir), main, shown)
        _to_board(model, Path(run_dir), results)
    return results


def _to_board(model: Recipe, run_dir: Path, results: dict[str, Any]) -> None:
    """The results as TensorBoard scalars at the run's last step, where the run logs there."""
    run = model.run_config
    if run is not None and "tensorboard" in run.train.log_to:
        board = open_board(run_dir)
        add_scalars(board, "eval", results, run.train.steps, leave_out=("data", "skipped"))
        board.close()


@dataclass
class _Plan:
    """Where each task reads its data: split names of `data` (None: `data` itself)."""

    data: Path
    main: str | None  # retrieval, probe, captioning, VQA
    labelled: str | None  # zero-shot classification
    compositional: str | None
    templates: list[str] | None
    label_sets: Callable[[CaptionDataset], dict[str, tuple[list[int], list[str]]]]
    offers: set[str]  # the tasks the data allows
    label_key: str | None = None  # the label column of a CSV or JSONL set
    image_root: Path | None = None  # where listed images lie (default: beside the listing)
    opened: dict[str | None, CaptionDataset] = field(default_factory=dict)
    skipped: dict[str, list[Skipped]] = field(default_factory=dict)  # by split: listing and decoding skips

    def skips(self, split: str | None) -> list[Skipped]:
        """The list that collects `split`'s skips (eval.json names the data itself "data")."""
        return self.skipped.setdefault(split or "data", [])

    def read(self, split: str | None) -> CaptionDataset:
        """A split as read from disk, kept: each split is read once."""
        if split not in self.opened:
            self.opened[split] = open_dataset(
                self.data, split=split, label_key=self.label_key, image_root=self.image_root
            )
        return self.opened[split]

    def open(self, split: str | None) -> CaptionDataset:
        """A split to evaluate on: an error if it has no usable sample; its listing-time skips
        start its `skips`."""
        dataset = self.read(split)
        if (split or "data") not in self.skipped:
            if not len(dataset):
                raise DataError(
                    f"{self.data}: split {split or '(the data itself)'} has no usable sample; "
                    f"{format_skips(dataset.skipped)}"
                )
            self.skips(split).extend(dataset.skipped)
        return dataset


def _shapes_plan(data: Path) -> _Plan:
    """The shapes world: retrieval, probe, captioning and VQA on "test", zero-shot on "classify"
    for each label task of info.json (shape, colour, colour+shape) with its prompt templates."""
    info = json.loads((data / "info.json").read_text())

    def label_sets(dataset: CaptionDataset) -> dict[str, tuple[list[int], list[str]]]:
        return {
            task: ([names.index(dataset.meta(i)["labels"][task]) for i in range(len(dataset))], names)
            for task, names in info["classes"].items()
        }

    compositional = "compositional" if info["splits"].get("compositional") else None
    return _Plan(data, "test", "classify", compositional, info["prompt_templates"], label_sets, set(TASKS))


def _data_plan(
    data: Path,
    split: str | None,
    classes: list[str] | None,
    templates: list[str] | None,
    label_key: str | None,
    image_root: Path | None,
) -> _Plan:
    """Any other data set: every task on the one set (`split` of `data`, or `data` itself), as
    far as it holds what the task needs (labels, captions, question-answer pairs, swaps)."""

    def label_sets(dataset: CaptionDataset) -> dict[str, tuple[list[int], list[str]]]:
        return {"": class_labels(dataset, classes)}  # one label set, unnamed

    plan = _Plan(data, split, split, None, templates, label_sets, set(), label_key, image_root)
    if split is None:
        split = plan.main = plan.labelled = _default_split(plan)
    dataset = plan.open(split)
    plan.templates = templates or dataset.templates or None
    metas = [dataset.meta(i) for i in range(len(dataset))]
    if any("label" in m or "label_id" in m for m in metas):
        plan.offers.add("zeroshot")
    if any(dataset.captions(i) for i in range(len(dataset))):
        plan.offers |= {"retrieval", "caption"}
    plan.offers |= {task for task, key in (("vqa", "qa"), ("probe", "swaps")) if any(m.get(key) for m in metas)}
    return plan


def _default_split(plan: _Plan) -> str | None:
    """None where the data itself is the set (a listing file, shards, class folders; read here,
    kept by `plan`), "test" for a directory of splits and for a COCO-Karpathy file."""
    if plan.data.is_file():
        return "test" if plan.data.suffix == ".json" else None
    try:
        plan.read(None)
        return None
    except DataError:
        return "test"


def _chosen_tasks(model: Recipe, tasks: Iterable[str] | None, plan: _Plan) -> list[str]:
    """The tasks to run: those asked (default: all) that the recipe supports and the data offers;
    a task asked for explicitly that the data cannot serve is an error naming what is missing."""
    supported = model.eval_tasks
    if tasks is None:
        return [task for task in supported if task in plan.offers]
    missing = [task for task in tasks if task in supported and task not in plan.offers]
    if missing:
        needs = {
            "zeroshot": "labels",
            "retrieval": "captions",
            "caption": "captions",
            "vqa": "question-answer pairs",
            "probe": "swap pairs",
        }
        raise DataError(
            f"{plan.data}: --tasks {','.join(missing)} need(s) "
            f"{', '.join(needs[t] for t in missing)}, which the data set does not hold"
        )
    if set(tasks) - set(supported):
        console.print(
            f"[yellow]skipping {sorted(set(tasks) - set(supported))}: recipe {model.recipe} supports {list(supported)}"
        )
    return [task for task in tasks if task in supported]


def _save_examples(run_dir: Path, dataset: CaptionDataset, shown: list[dict]) -> None:
    """Write the example images as PNGs next to examples.json (the HTML report shows them)."""
    folder = run_dir / "examples"
    folder.mkdir(exist_ok=True)
    for example in shown:
        example["image"] = f"examples/{example['index']}.png"
        dataset[example["index"]].image.save(run_dir / example["image"])
    (run_dir / "examples.json").write_text(json.dumps(shown, indent=2))
