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
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "meteor")
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


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = ("bleu4", "cider", "meteor"),
) -> dict[str, float | list[str]]:
    """Corpus-level caption scores in % for one predicted caption per key against its references.

    `metrics` are names from METRICS. The result also holds `skipped`: one "metric: reason" line
    per requested metric that could not run (METEOR needs `java` on the PATH).
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
    if "meteor" in metrics:
        if shutil.which("java"):
            result["meteor"] = 100.0 * _meteor(gts, res)
        else:
            skipped.append("meteor: java not found on PATH")
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
