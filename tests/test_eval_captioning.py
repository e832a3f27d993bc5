"""Caption metrics and VQA accuracy on hand-made cases with values derived by hand."""

import importlib.util
import math
import shutil

import pytest

from vlp.data.shapes import ShapesWorld
from vlp.eval.captioning import caption_diversity, caption_metrics, tokenize
from vlp.eval.vqa import normalize_answer, vqa_accuracy

needs_coco = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None, reason="needs pycocoevalcap (vlp[caption])"
)


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red-circle, LEFT of the square.") == "a red circle left of the square"


def test_caption_diversity_counts_distinct_ngrams_and_unique_captions():
    # Unigrams: a red circle | a red circle | a blue square -> 9 in all, 5 distinct.
    # Bigrams: (a red) (red circle) twice, (a blue) (blue square) -> 6 in all, 4 distinct.
    d = caption_diversity(["A red circle.", "a red circle", "a blue square"])
    assert d["distinct_1"] == pytest.approx(100 * 5 / 9)
    assert d["distinct_2"] == pytest.approx(100 * 4 / 6)
    assert d["unique_captions"] == pytest.approx(100 / 3)
    assert caption_diversity(["one", "two"]) == {"distinct_1": 100.0, "distinct_2": 0.0, "unique_captions": 100.0}
    with pytest.raises(ValueError):
        caption_diversity([])


@needs_coco
def test_bleu_identical_is_100_and_disjoint_is_0():
    m = caption_metrics(
        {0: "A red circle above a blue square."},
        {0: ["a red circle above a blue square"]},
        metrics=("bleu1", "bleu4", "cider"),
    )
    assert m["bleu1"] == pytest.approx(100.0, abs=1e-6)
    assert m["bleu4"] == pytest.approx(100.0, abs=1e-6)
    assert m["skipped"] == []
    m = caption_metrics(
        {0: "green triangles everywhere today"},
        {0: ["a red circle above a blue square", "one red circle"]},
        metrics=("bleu4", "cider"),
    )
    assert m["bleu4"] < 1e-6
    assert m["cider"] == 0.0


@needs_coco
def test_bleu4_matches_hand_computation():
    # 8 prediction words against the closest reference (10 words; the other has 4).
    # matched / total n-grams: 1-grams 8/8 ("a" twice, twice in the reference),
    # 2-grams 6/7 (not "circle left"), 3-grams 4/6 (not "red circle left", "circle left of"),
    # 4-grams 2/5 ("left of a blue", "of a blue square").
    m = caption_metrics(
        {"x": "a red circle left of a blue square"},
        {"x": ["a red circle to the left of a blue square", "the circle is red"]},
        metrics=("bleu4",),
    )
    precisions = [8 / 8, 6 / 7, 4 / 6, 2 / 5]
    brevity = math.exp(1 - 10 / 8)
    expected = 100 * math.prod(precisions) ** (1 / 4) * brevity
    # the toolkit adds 1e-15 / 1e-9 to counts, far below this tolerance
    assert m["bleu4"] == pytest.approx(expected, abs=1e-6)


@needs_coco
def test_cider_by_document_frequency():
    # Every n-gram in the references of every image: idf = log(N / N) = 0, so CIDEr is 0
    # even for perfect captions.
    same = "a red circle above a blue square"
    m = caption_metrics({i: same for i in range(3)}, {i: [same] for i in range(3)}, metrics=("cider",))
    assert m["cider"] == 0.0
    # Disjoint vocabularies: each n-gram has the same idf log(2), a perfect caption has cosine 1
    # for n = 1..4 and no length penalty, so CIDEr-D = 10 x mean(1, 1, 1, 1), i.e. 1000 %.
    refs = {"a": ["a red circle above a blue square"], "b": ["two green triangles touching"]}
    m = caption_metrics({k: v[0] for k, v in refs.items()}, refs, metrics=("cider",))
    assert m["cider"] == pytest.approx(1000.0, abs=1e-6)


@needs_coco
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_identical_caption_scores_high():
    m = caption_metrics(
        {0: "a red circle above a blue square", 1: "two green triangles"},
        {0: ["a red circle above a blue square"], 1: ["two green triangles"]},
        metrics=("meteor",),
    )
    assert m["meteor"] > 90
    assert m["skipped"] == []


@needs_coco
def test_meteor_skipped_without_java_is_recorded(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    m = caption_metrics({0: "a red circle"}, {0: ["a red circle"]}, metrics=("bleu1", "meteor"))
    assert "meteor" not in m
    assert m["skipped"] == ["meteor: java not found on PATH"]


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match="missing from references.*'img2'"):
        caption_metrics({"img1": "a", "img2": "b"}, {"img1": ["a"]})
    with pytest.raises(ValueError, match="missing from predictions.*'img3'"):
        caption_metrics({"img1": "a"}, {"img1": ["a"], "img3": ["c"]})
    with pytest.raises(ValueError, match="references\\['img1'\\]"):
        caption_metrics({"img1": "a"}, {"img1": []})
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_metrics({"img1": "a"}, {"img1": ["a"]}, metrics=("rouge",))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two.", "2"),
        ("2", "2"),
        ("ten", "10"),
        ("Zero", "0"),
        ("YES!", "yes"),
        ("the red circle", "red circle"),
        ("an  Orange", "orange"),
        ("eleven", "eleven"),
        ("one-two", "1 2"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_accuracy_per_type():
    predictions = ["Red", "blue", "2", "three", "yes", "No.", "a circle"]
    answers = ["red", "red", "two", "two", "yes", "no", "circle"]
    types = ["color", "color", "count", "count", "exists", "exists", "shape"]
    m = vqa_accuracy(predictions, answers, types)
    assert m["accuracy"] == pytest.approx(100 * 5 / 7)
    assert m["n"] == 7
    assert (m["accuracy_color"], m["accuracy_count"], m["accuracy_exists"], m["accuracy_shape"]) == (
        50.0,
        50.0,
        100.0,
        100.0,
    )
    assert (m["n_color"], m["n_count"], m["n_exists"], m["n_shape"]) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="lengths differ"):
        vqa_accuracy(["a"], ["a", "b"], ["color"])


def test_shapes_answers_normalise():
    qa = [q for i in range(20) for q in ShapesWorld().scene("test", i)["qa"]]
    answers = [q["answer"] for q in qa]
    assert all(normalize_answer(a).isdigit() for a, q in zip(answers, qa) if q["type"] == "count")
    m = vqa_accuracy([a.upper() + "." for a in answers], answers, [q["type"] for q in qa])
    assert m["accuracy"] == 100.0
    assert {k for k in m if k.startswith("n_")} == {"n_color", "n_shape", "n_count", "n_exists", "n_relation"}
