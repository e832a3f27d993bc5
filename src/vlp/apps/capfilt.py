"""CapFilt (BLIP, Li et al. 2022, Sec. 3.3): bootstrap a cleaner data set with a captioner and a
filter fine-tuned from one pretrained model on a small clean set.

For every image of the noisy set the captioner samples synthetic captions (nucleus sampling by
default, which the paper found better than beam search for all its noise), then the filter
keeps, among the web caption(s) and the synthetic ones, those whose ITM match probability
reaches a threshold. BLIP-2's variant (Sec. 3.4 of its paper) ranks all candidates with a CLIP
model instead and keeps the best `keep`.

The output is a data set (`train.jsonl` with images under `images/`, or webdataset shards under
`train/`) whose samples carry the source sample's metadata and a `provenance` list: every
candidate with its `source` (web or synthetic), `score` and whether it was `kept`. Work is done
in parts of `chunk` samples, each written atomically: a killed run continues where it stopped,
with the same output (sampling is seeded per part).

`run` is the whole of it as `vlp capfilt` does it (fine-tuning both models first); `bootstrap`
takes any captioner and scorer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlp.data.formats import CaptionDataset, write_webdataset
from vlp.data.sample import Skipped
from vlp.data.transforms import model_images
from vlp.eval.captioning import DEFAULT_DECODING, decoding_preset
from vlp.train.checkpoint import write_text_atomic

Captioner = Callable[[list[Any], torch.Generator], list[list[str]]]  # images -> captions per image
Scorer = Callable[[list[Any], list[list[str]]], list[list[float]]]  # images, candidates -> scores


@dataclass
class CapFiltOptions:
    synthetic: int = 1  # captions sampled per image (BLIP: 1)
    method: str = "nucleus"  # nucleus | beam
    top_p: float = 0.9
    max_new_tokens: int = DEFAULT_DECODING["max_new_tokens"]  # capped at the captioner's context length
    threshold: float = 0.5  # ITM match probability a caption needs (itm mode)
    mode: str = "itm"  # itm: BLIP's filter | rank: BLIP-2's CLIP ranking, keep the best `keep`
    keep: int = 2
    chunk: int = 512  # samples per resumable part
    batch_size: int = 64
    seed: int = 0
    limit: int | None = None  # only the first `limit` samples


def select(candidates: Sequence[dict[str, Any]], options: CapFiltOptions) -> list[bool]:
    """Which scored candidates ({"text", "source", "score"}) to keep: score >= threshold (itm),
    or the `keep` best (rank)."""
    if options.mode == "itm":
        return [c["score"] >= options.threshold for c in candidates]
    if options.mode == "rank":
        best = sorted(range(len(candidates)), key=lambda i: -candidates[i]["score"])[: options.keep]
        return [i in best for i in range(len(candidates))]
    raise ValueError(f"CapFilt mode must be 'itm' or 'rank', got {options.mode!r}")


def bootstrap(
    dataset: CaptionDataset,
    out: Path,
    captioner: Captioner,
    scorer: Scorer,
    options: CapFiltOptions,
    stop_after: int | None = None,
    progress: Callable[[int], None] | None = None,
    format: str = "jsonl",
) -> Path:
    """Write the train split of the bootstrapped set from `dataset` into `out`: `train.jsonl`
    with `images/` (format "jsonl") or webdataset shards `train/train-000000.tar`, ... ("wds").
    Parts already in `out/parts` are kept (resume, with the same options only); `stop_after`
    parts simulates a kill (tests). `progress(n)` is called with the number of samples of each
    finished part. Returns the path of the written split (`out` when stopped early)."""
    check_output(out, format)
    parts_dir, images_dir = out / "parts", out / "images"
    parts_dir.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(exist_ok=True)
    _check_options(out / "capfilt_options.json", options)
    total = min(len(dataset), options.limit or len(dataset))
    for number, start in enumerate(range(0, total, options.chunk)):
        part, indices = parts_dir / f"part_{number:05d}.jsonl", range(start, min(start + options.chunk, total))
        if not part.is_file():
            if stop_after is not None and number >= stop_after:
                return out
            records = _process(
                dataset,
                indices,
                images_dir,
                captioner,
                scorer,
                options,
                torch.Generator().manual_seed(options.seed * 100_003 + number),
            )
            write_text_atomic(part, "".join(json.dumps(record) + "\n" for record in records))
        if progress is not None:
            progress(len(indices))
    kept = [record for record in _read_parts(out) if record["caption"]]
    return OUTPUT_FORMATS[format](out, kept)


def _write_jsonl(out: Path, records: list[dict[str, Any]]) -> Path:
    shutil.rmtree(out / "train", ignore_errors=True)  # shards of an earlier run in the other format
    write_text_atomic(out / "train.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    return out / "train.jsonl"


def _write_shards(out: Path, records: list[dict[str, Any]]) -> Path:
    """Shards written beside `train/` and moved there whole, so a kill never leaves half a split."""
    staging, split = out / "train.partial", out / "train"
    shutil.rmtree(staging, ignore_errors=True)
    write_webdataset(
        staging,
        "train",
        (
            (
                f"train_{r['source_index']:08d}",
                (out / r["image"]).read_bytes(),
                {k: v for k, v in r.items() if k != "image"},
            )
            for r in records
        ),
    )
    shutil.rmtree(split, ignore_errors=True)
    staging.rename(split)
    (out / "train.jsonl").unlink(missing_ok=True)  # an earlier run's output in the other format
    return split


OUTPUT_FORMATS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {"jsonl": _write_jsonl, "wds": _write_shards}


def _read_parts(out: Path) -> list[dict[str, Any]]:
    """Every record of the finished parts, in sample order."""
    return [
        json.loads(line)
        for part in sorted((out / "parts").glob("part_*.jsonl"))
        for line in part.read_text().splitlines()
    ]


def check_output(out: Path, format: str) -> None:
    """Refuse an unknown output format, or an output directory that holds a train split CapFilt
    did not write (a source data set, say): writing the output replaces `train.jsonl` and `train/`."""
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"CapFilt output format must be one of {', '.join(OUTPUT_FORMATS)}, got {format!r}")
    if not (out / "capfilt_options.json").is_file() and ((out / "train.jsonl").exists() or (out / "train").exists()):
        raise ValueError(
            f"{out} holds a data set CapFilt did not write (train.jsonl or train/); choose a new output directory"
        )


def _check_options(path: Path, options: CapFiltOptions) -> None:
    """Record the options of a run; a resumed run must use the same ones."""
    current = asdict(options)
    if path.is_file() and json.loads(path.read_text()) != current:
        raise ValueError(
            f"{path.parent} was started with other CapFilt options ({path}); "
            "use a new --out or the same options to resume"
        )
    write_text_atomic(path, json.dumps(current, indent=2))


def _process(
    dataset: CaptionDataset,
    indices: range,
    images_dir: Path,
    captioner: Captioner,
    scorer: Scorer,
    options: CapFiltOptions,
    generator: torch.Generator,
) -> list[dict[str, Any]]:
    """One record per readable sample: its metadata, the kept captions and every candidate's
    provenance; the image is written where any caption is kept."""
    records = []
    for batch_start in range(indices.start, indices.stop, options.batch_size):
        batch = [(i, dataset[i]) for i in range(batch_start, min(batch_start + options.batch_size, indices.stop))]
        batch = [(i, sample) for i, sample in batch if not isinstance(sample, Skipped)]
        if not batch:
            continue
        images = [sample.image for _, sample in batch]
        synthetic = captioner(images, generator)
        candidates = [
            [{"text": t, "source": "web"} for t in sample.captions]
            + [{"text": t, "source": "synthetic"} for t in generated]
            for (_, sample), generated in zip(batch, synthetic)
        ]
        scores = scorer(images, [[c["text"] for c in group] for group in candidates])
        for (index, sample), group, group_scores in zip(batch, candidates, scores):
            for candidate, score in zip(group, group_scores):
                candidate["score"] = round(float(score), 6)
            for candidate, kept in zip(group, select(group, options)):
                candidate["kept"] = bool(kept)
            record = {
                **sample.meta,
                "image": f"images/{index:08d}.png",
                "source_index": index,
                "caption": [c["text"] for c in group if c["kept"]],
                "provenance": group,
            }
            if record["caption"]:
                sample.image.save(images_dir / f"{index:08d}.png")
            records.append(record)
    return records


def summarize(out: Path, thresholds: Sequence[float] = tuple(i / 20 for i in range(21))) -> dict[str, Any]:
    """Counts of the bootstrapped set and, where the source flags noisy captions (shapes world),
    the filter's precision and recall at removing them, at the chosen threshold and over a
    range of thresholds (the precision/recall curve; itm mode), the % of web captions removed per
    noise kind ("clean" for the clean ones), and how many captions are true of their image
    before and after (`truth`)."""
    records = _read_parts(out)
    web = [(c, r) for r in records for c in r["provenance"] if c["source"] == "web"]
    synthetic = [c for r in records for c in r["provenance"] if c["source"] == "synthetic"]
    stats: dict[str, Any] = {
        "images": len(records),
        "images_kept": sum(bool(r["caption"]) for r in records),
        "web_captions": len(web),
        "web_removed": sum(not c["kept"] for c, _ in web),
        "synthetic_generated": len(synthetic),
        "synthetic_added": sum(c["kept"] for c in synthetic),
    }
    flagged = [(c, r) for c, r in web if r.get("noisy") is not None]
    if flagged:
        noisy = [bool(r["noisy"]) for _, r in flagged]
        stats["filter_at_threshold"] = _precision_recall([not c["kept"] for c, _ in flagged], noisy)
        stats["filter_curve"] = [
            {"threshold": t, **_precision_recall([c["score"] < t for c, _ in flagged], noisy)} for t in thresholds
        ]
        removed: dict[str, list[bool]] = {}
        for c, r in flagged:
            removed.setdefault(r.get("noise_kind") or "clean", []).append(not c["kept"])
        stats["removed_by_noise_kind"] = {kind: 100.0 * sum(v) / len(v) for kind, v in sorted(removed.items())}
    if records and all("objects" in r for r in records):
        stats["truth"] = _truth(records)
    return stats


def _truth(records: list[dict[str, Any]]) -> dict[str, float]:
    """Shapes world, whose scenes say what is true: the % of candidate captions true of their
    image, per source, among all and among the kept ones (a caption that does not parse counts
    as false, and is counted), and the % of distinct synthetic captions."""
    from vlp.data.shapes import caption_is_true

    def is_true(text: str, objects: list[dict]) -> bool | None:
        try:
            return caption_is_true(text, objects)
        except ValueError:
            return None

    truth: dict[str, list[bool | None]] = {"web": [], "synthetic": [], "web_kept": [], "synthetic_kept": [], "kept": []}
    for record in records:
        for candidate in record["provenance"]:
            value = is_true(candidate["text"], record["objects"])
            names = [candidate["source"]] + ([f"{candidate['source']}_kept", "kept"] if candidate["kept"] else [])
            for name in names:
                truth[name].append(value)
    stats = {
        f"{name}_true": 100.0 * sum(bool(v) for v in values) / len(values) for name, values in truth.items() if values
    }
    stats["synthetic_unparsed"] = sum(v is None for v in truth["synthetic"])
    synthetic = [c["text"] for r in records for c in r["provenance"] if c["source"] == "synthetic"]
    if synthetic:
        stats["synthetic_distinct"] = 100.0 * len(set(synthetic)) / len(synthetic)
    return stats


def _precision_recall(removed: list[bool], noisy: list[bool]) -> dict[str, float]:
    """Precision and recall (%) of removing noisy captions."""
    hits = sum(r and n for r, n in zip(removed, noisy))
    return {
        "precision": 100.0 * hits / max(sum(removed), 1),
        "recall": 100.0 * hits / max(sum(noisy), 1),
        "removed": sum(removed),
    }


def model_captioner(model: Any, options: CapFiltOptions) -> Captioner:
    """`options.synthetic` captions per image from a vlp captioner (nucleus sampling with the
    part's generator, or beam search: then one caption, repeated); none with `synthetic` 0."""
    decoding = {**decoding_preset(options.method), "max_new_tokens": options.max_new_tokens}
    if options.method == "nucleus":
        decoding["top_p"] = options.top_p

    @torch.no_grad()
    def caption(images: list[Any], generator: torch.Generator) -> list[list[str]]:
        if options.synthetic == 0:  # filter only (the paper's ablation)
            return [[] for _ in images]
        batch = model_images(model, images).repeat_interleave(options.synthetic, dim=0)
        extra = {"generator": generator} if options.method == "nucleus" else {}
        texts = model.caption(batch, **decoding, **extra)
        k = options.synthetic
        return [texts[i * k : (i + 1) * k] for i in range(len(images))]

    return caption


def _flatten(candidates: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    texts = [t for group in candidates for t in group]
    rows = torch.tensor([i for i, group in enumerate(candidates) for _ in group])
    return texts, rows


def _regroup(scores: torch.Tensor, candidates: list[list[str]]) -> list[list[float]]:
    return [chunk.tolist() for chunk in scores.split([len(group) for group in candidates])]


def itm_scorer(model: Any) -> Scorer:
    """BLIP's filter: the ITM match probability of each (image, candidate caption)."""

    def score(images: list[Any], candidates: list[list[str]]) -> list[list[float]]:
        from vlp.eval.encode import itm_pair_scores, tokenize_texts

        texts, rows = _flatten(candidates)
        encoded = tokenize_texts(model, texts)
        probs = itm_pair_scores(model, images, encoded["input_ids"], encoded["attention_mask"], rows)
        return _regroup(probs, candidates)

    return score


def embedding_scorer(model: Any) -> Scorer:
    """BLIP-2's ranking: the image-text similarity of a contrastive model (CLIP)."""

    @torch.no_grad()
    def score(images: list[Any], candidates: list[list[str]]) -> list[list[float]]:
        from vlp.eval.encode import embed_texts, paired

        image_emb = model.encode_image(model_images(model, images)).cpu()
        texts, rows = _flatten(candidates)
        return _regroup(paired(model.embedding_similarity)(image_emb[rows], embed_texts(model, texts)), candidates)

    return score


def fine_tune(init: Path, clean: Path, out: Path, steps: int, progress: bool = True) -> tuple[Path, Path]:
    """The captioner (`blip_caption`) and the filter (`blip_retrieval`) fine-tuned from `init` on
    the clean set (its `clean` split, as the shipped configs say); finished runs are reused,
    interrupted ones resumed."""
    from vlp.train.checkpoint import latest_checkpoint, load_state
    from vlp.train.trainer import train_run

    runs = []
    for recipe, name in (("blip_caption", "captioner"), ("blip_retrieval", "filter")):
        run, checkpoint = out / name, latest_checkpoint(out / name)
        if checkpoint is None or load_state(checkpoint)["step"] < steps:
            train_run(
                recipe,
                run,
                overrides=[f"data.path={clean}", f"train.steps={steps}"],
                init=init,
                resume=checkpoint is not None,
                overwrite=checkpoint is None,
                progress=progress,
            )
        runs.append(run)
    return runs[0], runs[1]


def write_report(out: Path, stats: dict[str, Any]) -> Path:
    """out/report.html: the counts, the % of true captions (shapes world) and, with noise flags,
    the % removed per noise kind and the filter's precision/recall curve."""
    import html

    import matplotlib.pyplot as plt

    from vlp.eval.report import STYLE, figure_html

    table = {
        **{k: v for k, v in stats.items() if not isinstance(v, (dict, list))},
        **stats.get("truth", {}),
        **{f"removed_{kind}": v for kind, v in stats.get("removed_by_noise_kind", {}).items()},
    }
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{round(v, 1)}</td></tr>" for k, v in table.items())
    parts = [f"<h1>CapFilt: {html.escape(out.name)}</h1><table>{rows}</table>"]
    if "filter_curve" in stats:
        curve, chosen = stats["filter_curve"], stats["filter_at_threshold"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([p["recall"] for p in curve], [p["precision"] for p in curve], marker=".")
        ax.plot([chosen["recall"]], [chosen["precision"]], "o", color="tab:red", label="chosen threshold")
        ax.set(title="filter: removing noisy web captions", xlabel="recall (%)", ylabel="precision (%)")
        ax.legend()
        parts.append(
            f"<p>At the chosen threshold: precision {chosen['precision']:.1f} %, recall "
            f"{chosen['recall']:.1f} %.</p>" + figure_html(fig, "precision/recall curve")
        )
    path = out / "report.html"
    path.write_text(f"<!doctype html><meta charset=utf-8><style>{STYLE}</style>{''.join(parts)}")
    return path


def check_run(
    out: Path | str, options: CapFiltOptions, ranker: Path | str | None = None, format: str = "jsonl"
) -> None:
    """The argument errors `run` refuses before any work (fine-tuning takes a while): rank mode
    without a ranker, an unknown caption method, and the output `check_output` refuses."""
    if options.mode == "rank" and ranker is None:
        raise ValueError("--mode rank needs --ranker (a CLIP run)")
    if options.method not in ("nucleus", "beam"):
        raise ValueError(f"--method must be nucleus or beam, got {options.method!r}")
    check_output(Path(out), format)


def run(
    init: Path | str,
    data: Path | str,
    clean: Path | str,
    out: Path | str,
    *,
    steps: int = 200,
    options: CapFiltOptions | None = None,
    ranker: Path | str | None = None,
    format: str = "jsonl",
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """CapFilt end to end, as `vlp capfilt` runs it: fine-tune the captioner and the filter from
    `init` on `clean` (`fine_tune`, runs under `out`), bootstrap the train split of `data` into
    `out` (in `format`) with them, or with the CLIP run `ranker` as scorer in rank mode, copy
    the source's tokenizer.json and info.json (so that training on `out` finds them), and write
    out/capfilt.json (the `summarize` stats) and out/report.html. Resumable like `bootstrap`.
    Raises ValueError for invalid arguments (`check_run`) before any work. Returns the stats and
    the path of the written split."""
    from rich.progress import MofNCompleteColumn, Progress

    import vlp
    from vlp.data.formats import open_dataset

    options = options or CapFiltOptions()
    data, out = Path(data), Path(out)
    check_run(out, options, ranker, format)
    captioner_run, filter_run = fine_tune(Path(init), Path(clean), out, steps, progress)
    scorer = embedding_scorer(vlp.load(ranker)) if options.mode == "rank" else itm_scorer(vlp.load(filter_run))
    source = open_dataset(data, split="train")
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not progress) as bar:
        task = bar.add_task("capfilt", total=min(len(source), options.limit or len(source)))
        written = bootstrap(
            source,
            out,
            model_captioner(vlp.load(captioner_run), options),
            scorer,
            options,
            progress=lambda n: bar.advance(task, n),
            format=format,
        )
    for name in ("tokenizer.json", "info.json"):  # so that `vlp train --data OUT` finds them
        if (data / name).is_file():
            (out / name).write_bytes((data / name).read_bytes())
    stats = summarize(out)
    (out / "capfilt.json").write_text(json.dumps(stats, indent=2))
    write_report(out, stats)
    return stats, written


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """What `vlp capfilt` prints of the `summarize` stats: the counts, and the filter's precision
    and recall and the % of true captions where the source says (shapes world)."""
    lines = [
        (
            f"{stats['web_removed']} of {stats['web_captions']} web captions removed, "
            f"{stats['synthetic_added']} of {stats['synthetic_generated']} synthetic captions added, "
            f"{stats['images_kept']} of {stats['images']} images kept"
        )
    ]
    if "filter_at_threshold" in stats:
        chosen = stats["filter_at_threshold"]
        lines.append(
            f"filter on noisy web captions: precision {chosen['precision']:.1f} %, recall {chosen['recall']:.1f} %"
        )
    if "truth" in stats:
        lines.append(
            f"captions true of their image: {stats['truth']['web_true']:.1f} % of the web ones, "
            f"{stats['truth'].get('kept_true', 0.0):.1f} % of the kept ones"
        )
    return lines
