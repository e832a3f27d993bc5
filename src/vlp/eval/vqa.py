"""VQA accuracy: exact match for single-answer worlds, and the official VQA metric.

Two metrics, one per kind of reference:

- `vqa_accuracy`: one reference answer per question (the shapes world, whose answers are single
  words: a colour, a shape, "yes"/"no", or a count written as a word; `normalize_answer` makes
  "Two.", "2" and "two" the same answer). A prediction scores 1 or 0.
- `vqa_official_accuracy`: the answers of several annotators per question (VQAv2 has ten), scored
  as the VQA benchmark scores them (Antol et al. 2015, the open-ended task; its evaluation page):
  an answer is worth min(#annotators who gave it / 3, 1), averaged over the ten subsets of nine
  annotators that leave one out, so matching three annotators earns full credit.
  `normalize_official` applies the benchmark's answer normalisation first.

Both report percentages overall and per type, with counts: `accuracy`, `n`, `accuracy_<type>`,
`n_<type>` (VQAv2's types are its answer types: "yes/no", "number", "other").
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.eval.encode import image_batches
from vlp.models.recipe import Recipe

_WORD = re.compile(r"[^\W_]+")
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    word: str(i)
    for i, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
}


def normalize_answer(text: str) -> str:
    """Lowercase words without punctuation or articles, number words "zero".."ten" as digits."""
    words = _WORD.findall(text.lower())
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[str], types: list[str]) -> dict[str, float]:
    """Exact-match accuracy (%) after `normalize_answer`, and question counts.

    Keys: `accuracy` and `n` over all questions, `accuracy_<type>` and `n_<type>` per type.
    """
    _check_lengths(predictions, answers, types)
    scores = [float(normalize_answer(p) == normalize_answer(a)) for p, a in zip(predictions, answers)]
    return _by_type(scores, types)


# ---------------------------------------------------------------------------------------------
# the official VQA metric (VQA v1/v2, and the benchmarks that reuse it: VizWiz, TextVQA, OK-VQA)

# The benchmark's normalisation, as visualqa.org/evaluation.html states it and the reference
# evaluation (GT-Vision-Lab/VQA, vqaEval.py) does it: punctuation, then periods, then per word
# lowercase, number words, articles, contractions.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # not apostrophes (possessives) nor colons (times, 2:50)
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")  # "100,978": a thousands separator
_PERIOD = re.compile(r"\.(?![0-9])")  # every period except one before a digit (2.5, .5)
_OFFICIAL_NUMBERS = {"none": "0", **_NUMBERS}

# Contractions written without their apostrophe ("dont") get it back. The benchmark's table holds
# these forms, each also written with any one of its apostrophes missing ("couldnt've" and
# "couldn'tve" for "couldn't've"); a missing apostrophe that makes another word ("shell", "were",
# "its", "well") is not in it. Its entries with a capital I ("Im", "Ive") never match the
# lowercased words, so they are left out.
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't
    mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've
    should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've
    someone'll someone's something'd something'd've something'll that's there'd there'd've
    there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
    what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
    who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd
    you'd've you'll you're you've
""".split()
_CONTRACTIONS = {form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, c in enumerate(form) if c == "'"}
# The reference table maps this one the wrong way round; kept, so that scores match it.
_CONTRACTIONS["somebody'd"] = "somebodyd"


def normalize_official(text: str) -> str:
    """An answer in the VQA benchmark's normal form: "Two dogs." -> "2 dogs", "dont" -> "don't".

    1. Tabs and newlines become spaces; the ends are stripped.
    2. Each punctuation mark of `_PUNCTUATION` is removed where it touches a space or where the
       text has a comma between digits ("100,978" -> "100978"), else replaced by a space
       ("black-and-white" -> "black and white"). Apostrophes and colons stay.
    3. Periods are removed unless a digit follows ("3.5" stays).
    4. Lowercased words; number words "none", "zero".."ten" become digits; the articles a, an,
       the are dropped; contractions missing their apostrophe get it back.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    between_digits = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if between_digits or beside_space else " ")
    words = (_OFFICIAL_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_answer_score(prediction: str, answers: list[str]) -> float:
    """The official accuracy (0..1) of one answer given the annotators' answers.

    For each annotator left out, min(#other annotators who gave the prediction / 3, 1); the mean
    over the annotators. With ten annotators of whom k gave it: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4 or more -> 1. Prediction and answers are compared in `normalize_official` form.

    The reference script normalises only when the annotators disagree, so against ten "yes" it
    scores "Yes." 0; the evaluation page says predictions are always normalised, and so they are
    here ("Yes." scores 1).
    """
    if len(answers) < 2:
        raise ValueError(f"{len(answers)} annotator answers: the VQA metric leaves one of several out (VQAv2 has 10)")
    predicted = normalize_official(prediction)
    matches = [normalize_official(a) == predicted for a in answers]
    total = sum(matches)
    return sum(min((total - left_out) / 3, 1.0) for left_out in matches) / len(answers)


def vqa_official_accuracy(predictions: list[str], answer_lists: list[list[str]], types: list[str]) -> dict[str, float]:
    """The official VQA accuracy (%) of `predictions`, each scored by `vqa_answer_score` against
    its question's annotator answers, overall and per type (VQAv2: the answer type).

    Keys as `vqa_accuracy`: `accuracy` and `n`, `accuracy_<type>` and `n_<type>`. Unlike the
    reference script, nothing is rounded.
    """
    _check_lengths(predictions, answer_lists, types)
    return _by_type([vqa_answer_score(p, a) for p, a in zip(predictions, answer_lists)], types)


def _check_lengths(predictions: list[str], answers: list, types: list[str]) -> None:
    if not len(predictions) == len(answers) == len(types):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers, {len(types)} types")
    if not predictions:
        raise ValueError("no predictions to score")


def _by_type(scores: list[float], types: list[str]) -> dict[str, float]:
    """Mean score (%) and count overall and per type."""
    by_type: defaultdict[str, list[float]] = defaultdict(list)
    for score, kind in zip(scores, types):
        by_type[kind].append(score)
    result = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(scores)}
    for kind in sorted(by_type):
        result[f"accuracy_{kind}"] = 100.0 * sum(by_type[kind]) / len(by_type[kind])
        result[f"n_{kind}"] = len(by_type[kind])
    return result


@torch.no_grad()
def vqa(
    model: Recipe, dataset: CaptionDataset, batch_size: int = 64, skipped: list[Skipped] | None = None
) -> dict[str, float]:
    """Accuracy (overall and per question type) of greedy answers to every question-answer pair
    of the split: VQAv2's official accuracy where pairs carry the ten annotators' "answers",
    exact match against the one "answer" otherwise (the shapes world). Images that do not
    decode are appended to `skipped`."""
    predictions, answers, types = [], [], []
    for indices, images in image_batches(model, dataset, [] if skipped is None else skipped, batch_size):
        pairs = [(row, qa) for row, index in enumerate(indices) for qa in dataset.meta(index).get("qa", [])]
        if not pairs:
            continue
        rows = torch.tensor([row for row, _ in pairs], device=images.device)
        predictions += model.answer_texts(images[rows], [qa["question"] for _, qa in pairs])
        answers += [qa.get("answers", qa["answer"]) for _, qa in pairs]
        types += [qa["type"] for _, qa in pairs]
    if not answers:
        raise ValueError(f"{dataset.source}: no question-answer pairs (meta.qa) to evaluate VQA on")
    if all(isinstance(answer, list) for answer in answers):
        return vqa_official_accuracy(predictions, answers, types)
    return vqa_accuracy(predictions, answers, types)
