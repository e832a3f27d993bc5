"""Caption metrics (BLEU, CIDEr-D, METEOR) through the COCO caption toolkit, `pycocoevalcap`,
and the diversity of a set of captions.

Captions are tokenised here, in Python: lowercased and split into runs of letters and digits, so
punctuation is dropped and hyphens and apostrophes split words ("left-of" -> "left of"). The
toolkit's PTBTokenizer does nearly the same but starts a Java process per call and is slow, so
scores can differ slightly from those of the official script. All values are percentages (the
toolkit's score x 100), as papers report them: BLEU in [0, 100], CIDEr in [0, 1000].
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.eval.encode import image_batches
from vlp.models.recipe import Recipe

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
EVAL_METRICS = METRICS  # what `vlp eval` reports: the COCO caption leaderboard's set
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> str:
    """Lowercased words (runs of letters and digits) joined by single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def _check(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], metrics: Sequence[str]
) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; expected some of {METRICS}")
    if not predictions:
        raise ValueError("no predictions to score")
    for missing, absent_from in (
        (set(predictions) - set(references), "references"),
        (set(references) - set(predictions), "predictions"),
    ):
        if missing:
            raise ValueError(f"{len(missing)} key(s) missing from {absent_from}, e.g. {next(iter(missing))!r}")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts a JVM, stopped by Meteor.__del__ when `scorer` goes out of scope
    return scorer.compute_score(gts, res)[0]


def _spice(gts: dict, res: dict) -> float:
    from pycocoevalcap.spice.spice import Spice

    return Spice().compute_score(gts, res)[0]


def _spice_missing() -> str | None:
    """Why SPICE cannot run here, or None: it needs Java and the Stanford CoreNLP 3.6.0 jars,
    which pycocoevalcap downloads on first use (not from PyPI) into its spice/lib folder."""
    if not shutil.which("java"):
        return "java not found on PATH"
    from pycocoevalcap.spice import get_stanford_models as models

    jar = Path(models.SPICEDIR) / models.SPICELIB / f"{models.JAR}.jar"
    return None if jar.is_file() else f"Stanford CoreNLP jars missing ({jar}; run get_stanford_models online)"


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = ("bleu4", "cider", "meteor"),
) -> dict[str, float | list[str]]:
    """Corpus-level caption scores in % for one predicted caption per key against its references.

    `metrics` are names from METRICS. The result also holds `skipped`: one "metric: reason" line
    per requested metric that could not run (METEOR needs `java` on the PATH; SPICE also the
    Stanford CoreNLP jars).
    """
    _check(predictions, references, metrics)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'vlp[caption]'") from err
    res = {key: [tokenize(caption)] for key, caption in predictions.items()}
    gts = {key: [tokenize(caption) for caption in references[key]] for key in predictions}
    result: dict[str, float | list[str]] = {}
    skipped = []
    if any(m.startswith("bleu") for m in metrics):
        bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
        result.update({m: 100.0 * bleu[int(m[-1]) - 1] for m in metrics if m.startswith("bleu")})
    if "cider" in metrics:
        result["cider"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        result["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "meteor" in metrics:
        if shutil.which("java"):
            result["meteor"] = 100.0 * _meteor(gts, res)
        else:
            skipped.append("meteor: java not found on PATH")
    if "spice" in metrics:
        missing = _spice_missing()
        if missing is None:
            result["spice"] = 100.0 * float(_spice(gts, res))
        else:
            skipped.append(f"spice: {missing}")
    result["skipped"] = skipped
    return result


def caption_diversity(captions: Sequence[str]) -> dict[str, float]:
    """How varied a set of generated captions is, in %: distinct-1/2 (Li et al. 2016, distinct
    n-grams over all n-grams of all captions) and the share of captions that occur only once
    among them (beam search repeats the same caption for similar images; sampling varies)."""
    if not captions:
        raise ValueError("no captions to measure")
    words = [tokenize(caption).split() for caption in captions]
    result = {}
    for n in (1, 2):
        grams = [tuple(w[i : i + n]) for w in words for i in range(len(w) - n + 1)]
        result[f"distinct_{n}"] = 100.0 * len(set(grams)) / max(len(grams), 1)
    counts = Counter(map(tuple, words))
    result["unique_captions"] = 100.0 * sum(counts[tuple(w)] == 1 for w in words) / len(words)
    return result


# 30 new tokens: the longest shapes-world caption is 22 (capped by the model at its context length)
DEFAULT_DECODING = {"method": "beam", "num_beams": 3, "max_new_tokens": 30, "min_new_tokens": 3}


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


@torch.no_grad()
def captioning(
    model: Recipe,
    dataset: CaptionDataset,
    decoding: dict[str, Any],
    batch_size: int = 64,
    skipped: list[Skipped] | None = None,
) -> tuple[dict[str, Any], dict[int, str]]:
    """EVAL_METRICS (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE where Java and its CoreNLP jars
    are present, else named in `skipped`) of generated captions against each image's references,
    and their diversity; returns the metrics and the captions by sample index.
    Images that do not decode are appended to `skipped`."""
    start = time.perf_counter()
    generated: dict[int, str] = {}
    for indices, images in image_batches(model, dataset, [] if skipped is None else skipped, batch_size):
        generated.update(zip(indices, model.caption(images, **decoding)))
    metrics = caption_metrics(generated, {i: dataset.captions(i) for i in generated}, EVAL_METRICS)
    metrics.update(caption_diversity(list(generated.values())))
    metrics.update(seconds=time.perf_counter() - start, decoding=[f"{k}={v}" for k, v in decoding.items()])
    return metrics, generated
