"""`vlp eval RUN`: the fixed evaluation protocols on a data set written by `vlp data shapes`.

Tasks: zeroshot (the "classify" split: shape, colour, colour+shape with prompt ensembles),
retrieval (the "test" split, and "compositional" where present; recipes with an ITM head also
re-rank the ITC shortlist), probe (swap pairs of the test split), caption (recipes with a
decoder: BLEU-4/CIDEr/METEOR on the test split), vqa (recipes that answer questions: accuracy
per question type). Results go to `RUN/eval.json`, retrieval
examples to `RUN/examples.json`.

Metrics are computed on the samples that could be read. Those that could not (left out of a
split's listing, or an image that does not decode) are printed once per split with
`format_skips` and recorded in eval.json under "skipped": for every split read,
`{"count": n, "samples": ["source: reason", ...]}` (the first 100), the shape of the trainer's
"skipped" records in metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from vlp.data.formats import CaptionDataset, format_skips, open_dataset
from vlp.data.sample import Skipped
from vlp.data.transforms import model_images
from vlp.eval.probe import swap_probe_accuracy
from vlp.eval.retrieval import blockwise_topk, recall_at_k, reranked_recall_at_k
from vlp.eval.zeroshot import class_embeddings, zeroshot_accuracy

TASKS = ("zeroshot", "retrieval", "probe", "caption", "vqa")
console = Console()
# 30 new tokens: the longest shapes-world caption is 22 (capped by the model at its context length)
DEFAULT_DECODING = {"method": "beam", "num_beams": 3, "max_new_tokens": 30, "min_new_tokens": 3}
SKIPS_LISTED = 100  # eval.json names the first this many skipped samples of each split


def decoding_preset(method: str) -> dict[str, Any]:
    """The decoding settings behind a method name: beam (3 beams, BLIP's evaluation), greedy, or
    nucleus (top-p 0.9), each with DEFAULT_DECODING's lengths."""
    presets = {
        "beam": DEFAULT_DECODING,
        "greedy": {**DEFAULT_DECODING, "method": "greedy"},
        "nucleus": {**DEFAULT_DECODING, "method": "nucleus", "top_p": 0.9},
    }
    if method not in presets:
        raise ValueError(f"decoding must be one of {sorted(presets)}, got {method!r}")
    options = dict(presets[method])
    if method != "beam":
        options.pop("num_beams")
    return options


def paired(
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], block: int = 256
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Row i of the images against row i of the texts, for any image-text `similarity`."""

    def scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [similarity(images[i : i + block], texts[i : i + block]).diagonal() for i in range(0, len(images), block)]
        )

    return scores


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def tokenize_texts(model: nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
    """`texts` encoded by the model's own tokenizer at its text context length."""
    return model.tokenizer(texts, max_length=model.text_config().context_length, style=model.tokenizer_style)


def embed_texts(model: nn.Module, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings of a list of strings, with the model's own tokenizer."""
    device = next(model.parameters()).device
    parts = []
    for chunk in _batches(texts, batch_size):
        tokens = tokenize_texts(model, chunk)
        parts.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
    return torch.cat(parts)


def image_batches(
    model: nn.Module, dataset: CaptionDataset, skipped: list[Skipped], batch_size: int = 256
) -> Iterable[tuple[list[int], torch.Tensor]]:
    """(indices, eval-transformed images on the model's device) of the readable samples;
    unreadable ones are appended to `skipped`."""
    for chunk in _batches(list(range(len(dataset))), batch_size):
        kept, images = [], []
        for index in chunk:
            item = dataset[index]
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            kept.append(index)
            images.append(item.image)
        if images:
            yield kept, model_images(model, images)


@torch.no_grad()
def embed_images(
    model: nn.Module, dataset: CaptionDataset, batch_size: int = 256
) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Normalised image embeddings of a data set; returns (embeddings, kept indices, skipped)."""
    kept, skipped, parts = [], [], []
    for indices, images in image_batches(model, dataset, skipped, batch_size):
        kept += indices
        parts.append(model.encode_image(images).cpu())
    return torch.cat(parts), kept, skipped


def _record(skipped: list[Skipped] | None, lost: list[Skipped]) -> None:
    """Append the `lost` samples to `skipped` where a caller collects them."""
    if skipped is not None:
        skipped.extend(lost)


def zeroshot(
    model: nn.Module, dataset: CaptionDataset, info: dict[str, Any], skipped: list[Skipped] | None = None
) -> dict[str, float]:
    """Top-1 accuracy on the classify split for each label task in `info["classes"]`; images
    that do not decode are appended to `skipped`."""
    image_emb, kept, lost = embed_images(model, dataset)
    _record(skipped, lost)
    results = {}
    for task, names in info["classes"].items():
        class_emb = class_embeddings(lambda t: embed_texts(model, t), names, info["prompt_templates"])
        labels = torch.tensor([names.index(dataset.meta(i)["labels"][task]) for i in kept])
        results[f"{task}_top1"] = zeroshot_accuracy(image_emb, labels, class_emb, model.embedding_similarity)
    return results


def texts_of(dataset: CaptionDataset, kept: list[int]) -> tuple[list[str], torch.Tensor]:
    """Every caption of the `kept` items and, for each, its item's row in `kept`."""
    texts, owner = [], []
    for row, index in enumerate(kept):
        captions = dataset.captions(index)
        texts += captions
        owner += [row] * len(captions)
    return texts, torch.tensor(owner)


def retrieval(
    model: nn.Module, dataset: CaptionDataset, examples: int = 0, k_test: int = 0, skipped: list[Skipped] | None = None
) -> tuple[dict, dict | None, list]:
    """Recall@1/5/10 both ways; with `k_test` and a recipe with an ITM head, also the recalls
    after ITM re-ranking of each query's ITC top-k_test; optionally the top-5 captions of the
    first `examples` images. Returns (ITC metrics, re-ranked metrics or None, examples); images
    that do not decode are appended to `skipped`."""
    start = time.perf_counter()
    image_emb, kept, lost = embed_images(model, dataset)
    _record(skipped, lost)
    texts, owner = texts_of(dataset, kept)
    text_emb = embed_texts(model, texts)
    metrics = recall_at_k(image_emb, text_emb, owner, similarity=model.embedding_similarity)
    metrics["seconds"] = time.perf_counter() - start
    reranked = None
    if k_test and model.has_itm():
        reranked = _itm_reranked(model, dataset, kept, image_emb, texts, owner, text_emb, k_test)
    shown = []
    if examples:
        top = blockwise_topk(image_emb[:examples], text_emb, 5, similarity=model.embedding_similarity)
        for row, indices in enumerate(top.tolist()):
            shown.append(
                {
                    "index": kept[row],
                    "truth": dataset.captions(kept[row]),
                    "top5": [{"caption": texts[j], "correct": int(owner[j]) == row} for j in indices],
                }
            )
    return metrics, reranked, shown


def itm_scorer(
    model: nn.Module, dataset: CaptionDataset, kept: list[int], texts: list[str], batch_size: int = 128
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(image_rows, text_rows): the model's ITM match probability of each (image, text) pair,
    rows indexing `kept` (the readable images of `dataset`) and `texts`.

    Pairs are scored in blocks sorted by image, and each block's images are read and encoded when
    it runs: memory is bounded by the block whatever the gallery size, and an image shortlisted by
    many queries is encoded about once (once per block it spans).
    """
    encoded = tokenize_texts(model, texts)

    def block_scores(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        unique, rows = image_rows.unique(return_inverse=True)
        return itm_pair_scores(
            model,
            [dataset[kept[i]].image for i in unique.tolist()],
            encoded["input_ids"][text_rows],
            encoded["attention_mask"][text_rows],
            rows,
        )

    def score(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        scores = torch.empty(len(image_rows))
        for block in image_rows.argsort(stable=True).split(batch_size):
            scores[block] = block_scores(image_rows[block], text_rows[block])
        return scores

    return score


@torch.no_grad()
def itm_pair_scores(
    model: nn.Module,
    images: Sequence[Image.Image],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rows: torch.Tensor,
) -> torch.Tensor:
    """The model's ITM match probability (on the CPU) of text i with `images[image_rows[i]]`
    (PIL images): each image is encoded and projected once, however many texts it pairs with."""
    device = next(model.parameters()).device
    tokens = model.itm_image_tokens(model_images(model, images))
    return model.itm_score(
        tokens, input_ids.to(device), attention_mask.to(device), image_rows=image_rows.to(device)
    ).cpu()


def _itm_reranked(
    model: nn.Module,
    dataset: CaptionDataset,
    kept: list[int],
    image_emb: torch.Tensor,
    texts: list[str],
    owner: torch.Tensor,
    text_emb: torch.Tensor,
    k_test: int,
) -> dict[str, float]:
    """Recall@K with each query's ITC top-`k_test` re-ranked by the model's ITM score; reports
    the extra seconds and the number of ITM (fusion) passes it cost."""
    start = time.perf_counter()
    itm = itm_scorer(model, dataset, kept, texts)
    pairs = 0

    def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        nonlocal pairs
        pairs += len(image_idx)
        return itm(image_idx, text_idx)

    metrics = reranked_recall_at_k(image_emb, text_emb, owner, score, k_test, similarity=model.embedding_similarity)
    metrics.update(extra_seconds=time.perf_counter() - start, k_test=k_test, itm_pairs=pairs)
    return metrics


@torch.no_grad()
def captioning(
    model: nn.Module,
    dataset: CaptionDataset,
    decoding: dict[str, Any],
    batch_size: int = 64,
    skipped: list[Skipped] | None = None,
) -> tuple[dict[str, Any], dict[int, str]]:
    """BLEU-4, CIDEr (and METEOR with Java) of generated captions against each test image's
    references, and their diversity; returns the metrics and the captions by sample index.
    Images that do not decode are appended to `skipped`."""
    from vlp.eval.captioning import caption_diversity, caption_metrics

    start = time.perf_counter()
    generated: dict[int, str] = {}
    for indices, images in image_batches(model, dataset, [] if skipped is None else skipped, batch_size):
        generated.update(zip(indices, model.caption(images, **decoding)))
    metrics = caption_metrics(generated, {i: dataset.captions(i) for i in generated})
    metrics.update(caption_diversity(list(generated.values())))
    metrics.update(seconds=time.perf_counter() - start, decoding=[f"{k}={v}" for k, v in decoding.items()])
    return metrics, generated


@torch.no_grad()
def vqa(
    model: nn.Module, dataset: CaptionDataset, batch_size: int = 64, skipped: list[Skipped] | None = None
) -> dict[str, float]:
    """Exact-match accuracy (overall and per question type) of greedy answers to every
    question-answer pair of the split; images that do not decode are appended to `skipped`."""
    from vlp.eval.vqa import vqa_accuracy

    predictions, answers, types = [], [], []
    for indices, images in image_batches(model, dataset, [] if skipped is None else skipped, batch_size):
        pairs = [(row, qa) for row, index in enumerate(indices) for qa in dataset.meta(index).get("qa", [])]
        if not pairs:
            continue
        rows = torch.tensor([row for row, _ in pairs], device=images.device)
        predictions += model.answer_texts(images[rows], [qa["question"] for _, qa in pairs])
        answers += [qa["answer"] for _, qa in pairs]
        types += [qa["type"] for _, qa in pairs]
    if not answers:
        raise ValueError(f"{dataset.source}: no question-answer pairs (meta.qa) to evaluate VQA on")
    return vqa_accuracy(predictions, answers, types)


@torch.no_grad()
def probe(model: nn.Module, dataset: CaptionDataset, skipped: list[Skipped] | None = None) -> dict[str, float]:
    """Swap-probe accuracy overall and per swap kind (attribute / relation), scoring captions by
    ITC similarity and, for recipes with an ITM head, also by ITM match probability (`itm_*`).
    Images that do not decode are appended to `skipped`."""
    image_emb, kept, lost = embed_images(model, dataset)
    _record(skipped, lost)
    pairs = [(row, swap) for row, index in enumerate(kept) for swap in dataset.meta(index).get("swaps", [])]
    if not pairs:
        return {}
    owner = torch.tensor([row for row, _ in pairs])
    true, false = [swap["true"] for _, swap in pairs], [swap["false"] for _, swap in pairs]
    images, pairwise = image_emb[owner], paired(model.embedding_similarity)
    scores = {"": (pairwise(images, embed_texts(model, true)), pairwise(images, embed_texts(model, false)))}
    if model.has_itm():
        itm = itm_scorer(model, dataset, kept, true + false)
        scores["itm_"] = itm(owner.repeat(2), torch.arange(2 * len(pairs))).chunk(2)  # true, then false
    kinds = [swap["kind"] for _, swap in pairs]
    results = {}
    for prefix, (true_score, false_score) in scores.items():
        results[f"{prefix}accuracy"] = swap_probe_accuracy(true_score, false_score)
        for kind in sorted(set(kinds)):
            select = torch.tensor([k == kind for k in kinds])
            results[f"{prefix}{kind}_accuracy"] = swap_probe_accuracy(true_score[select], false_score[select])
    return results


def evaluate(
    model: nn.Module,
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


def _save_examples(run_dir: Path, dataset: CaptionDataset, shown: list[dict]) -> None:
    """Write the example images as PNGs next to examples.json (the HTML report shows them)."""
    folder = run_dir / "examples"
    folder.mkdir(exist_ok=True)
    for example in shown:
        example["image"] = f"examples/{example['index']}.png"
        dataset[example["index"]].image.save(run_dir / example["image"])
    (run_dir / "examples.json").write_text(json.dumps(shown, indent=2))


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
