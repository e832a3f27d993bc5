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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vlp.data.formats import CaptionDataset, open_dataset
from vlp.data.sample import Skipped
from vlp.eval.captioning import DEFAULT_DECODING, captioning
from vlp.eval.encode import embed_images, embed_texts, record_skips
from vlp.eval.probe import probe
from vlp.eval.results import console, report_skips
from vlp.eval.retrieval import retrieval
from vlp.eval.vqa import vqa
from vlp.eval.zeroshot import class_embeddings, zeroshot_accuracy
from vlp.models.recipe import Recipe

TASKS = ("zeroshot", "retrieval", "probe", "caption", "vqa")


def zeroshot(
    model: Recipe, dataset: CaptionDataset, info: dict[str, Any], skipped: list[Skipped] | None = None
) -> dict[str, float]:
    """Top-1 accuracy on the classify split for each label task in `info["classes"]`; images
    that do not decode are appended to `skipped`."""
    image_emb, kept, lost = embed_images(model, dataset)
    record_skips(skipped, lost)
    results = {}
    for task, names in info["classes"].items():
        class_emb = class_embeddings(lambda t: embed_texts(model, t), names, info["prompt_templates"])
        labels = torch.tensor([names.index(dataset.meta(i)["labels"][task]) for i in kept])
        results[f"{task}_top1"] = zeroshot_accuracy(image_emb, labels, class_emb, model.embedding_similarity)
    return results


def evaluate(
    model: Recipe,
    data: Path,
    run_dir: Path | None = None,
    tasks: Iterable[str] | None = None,
    examples: int = 8,
    k_test: int = 16,
    decoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the chosen protocols (default: all the recipe supports); write eval.json (and
    examples.json) into `run_dir` if given."""
    data = Path(data)
    unknown = set(tasks or ()) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    info = json.loads((data / "info.json").read_text())
    supported = model.eval_tasks
    tasks = list(supported if tasks is None else tasks)
    if set(tasks) - set(supported):
        console.print(
            f"[yellow]skipping {sorted(set(tasks) - set(supported))}: recipe {model.recipe} supports {list(supported)}"
        )
    tasks = [task for task in tasks if task in supported]
    results: dict[str, Any] = {"data": str(data)}
    shown: list = []
    skipped: dict[str, list[Skipped]] = {}  # split -> its listing-time and decoding skips
    test = open_split(data, "test", skipped)
    if "zeroshot" in tasks:
        results["zeroshot"] = zeroshot(model, open_split(data, "classify", skipped), info, skipped["classify"])
    if "retrieval" in tasks:
        results["retrieval"], reranked, shown = retrieval(model, test, examples, k_test, skipped["test"])
        if reranked is not None:
            results["retrieval_itm"] = reranked
        if info["splits"].get("compositional"):
            compositional = open_split(data, "compositional", skipped)
            results["retrieval_compositional"] = retrieval(model, compositional, skipped=skipped["compositional"])[0]
    if "probe" in tasks:
        results["probe"] = probe(model, test, skipped["test"])
    if "vqa" in tasks:
        results["vqa"] = vqa(model, test, skipped=skipped["test"])
    if "caption" in tasks:
        results["caption"], generated = captioning(model, test, decoding or DEFAULT_DECODING, skipped=skipped["test"])
        for example in shown:
            example["generated"] = generated.get(example["index"])
    results["skipped"] = report_skips(skipped)
    if run_dir is not None:
        (Path(run_dir) / "eval.json").write_text(json.dumps(results, indent=2))
        _save_examples(Path(run_dir), test, shown)
    return results


def open_split(data: Path, split: str, skipped: dict[str, list[Skipped]]) -> CaptionDataset:
    """`split` of the data set `data`; its listing-time skips start `skipped[split]`."""
    dataset = open_dataset(data, split=split)
    skipped.setdefault(split, []).extend(dataset.skipped)
    return dataset


def _save_examples(run_dir: Path, dataset: CaptionDataset, shown: list[dict]) -> None:
    """Write the example images as PNGs next to examples.json (the HTML report shows them)."""
    folder = run_dir / "examples"
    folder.mkdir(exist_ok=True)
    for example in shown:
        example["image"] = f"examples/{example['index']}.png"
        dataset[example["index"]].image.save(run_dir / example["image"])
    (run_dir / "examples.json").write_text(json.dumps(shown, indent=2))
