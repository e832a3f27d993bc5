"""VQA accuracy by exact match of normalised answers, overall and per question type.

Shapes-world answers are single words: a colour, a shape, "yes"/"no", or a count written as a
word ("two"); normalisation makes "Two.", "2" and "two" the same answer.
"""

from __future__ import annotations

import re
from collections import Counter

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
    """Exact-match accuracy (%) after normalisation, and question counts.

    Keys: `accuracy` and `n` over all questions, `accuracy_<type>` and `n_<type>` per type.
    """
    if not len(predictions) == len(answers) == len(types):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(answers)} answers, {len(types)} types")
    if not predictions:
        raise ValueError("no predictions to score")
    correct, total = Counter(), Counter()
    for prediction, answer, kind in zip(predictions, answers, types):
        total[kind] += 1
        correct[kind] += normalize_answer(prediction) == normalize_answer(answer)
    result = {"accuracy": 100.0 * sum(correct.values()) / len(predictions), "n": len(predictions)}
    for kind in sorted(total):
        result[f"accuracy_{kind}"] = 100.0 * correct[kind] / total[kind]
        result[f"n_{kind}"] = total[kind]
    return result
