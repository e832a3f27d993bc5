"""VQAv2 as downloaded (vlp.data.formats.read_vqav2) and the official VQA accuracy (vlp.eval.vqa),
on small files in VQAv2's layout and hand-checked examples of the benchmark's rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.formats import format_skips, open_dataset, read_vqav2
from vlp.data.sample import DataError, Sample, Skipped
from vlp.eval.vqa import normalize_official, vqa_accuracy, vqa_answer_score, vqa_official_accuracy

# ---------------------------------------------------------------------------------------------
# VQAv2's files, written small


def jpeg(path: Path, seed: int, size: tuple[int, int] = (8, 6)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def annotation(question_id: int, image_id: int, answers: list[str], answer_type: str) -> dict:
    """A record of `v2_mscoco_<split>_annotations.json`: ten annotators' answers."""
    return {
        "question_id": question_id,
        "image_id": image_id,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        "multiple_choice_answer": max(answers, key=answers.count),
        "answer_type": answer_type,
        "question_type": "what is",
    }


QUESTIONS = [
    {"image_id": 42, "question": "Is there a dog? ", "question_id": 420},
    {"image_id": 7, "question": "How many cats are there?", "question_id": 70},
    {"image_id": 42, "question": "What colour is the dog?", "question_id": 421},
]
ANNOTATIONS = [
    annotation(420, 42, ["yes"] * 10, "yes/no"),
    annotation(70, 7, ["2"] * 6 + ["3"] * 4, "number"),
    annotation(421, 42, ["brown"] * 7 + ["black and white"] * 3, "other"),
]


def write_vqav2(
    root: Path,
    questions: list = QUESTIONS,
    annotations: list | None = ANNOTATIONS,
    split: str = "val2014",
    image_ids: tuple[int, ...] = (42, 7),
    name: str = "COCO_{split}_{image_id:012d}.jpg",
    folder: str | None = "val2014",
) -> Path:
    """VQAv2's layout: the two JSON files, and the images in COCO's folder with COCO's names."""
    root.mkdir(parents=True, exist_ok=True)
    info = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "license": {}}
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({**info, "questions": questions}))
    if annotations is not None:
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({**info, "annotations": annotations}))
    for image_id in image_ids:
        jpeg(root / (folder or "") / name.format(split=split, image_id=image_id), image_id)
    return root


# ---------------------------------------------------------------------------------------------
# reading


def test_reads_vqav2_as_downloaded(tmp_path):
    root = write_vqav2(tmp_path / "vqav2")
    assert (root / "val2014" / "COCO_val2014_000000000042.jpg").is_file()
    data = read_vqav2(root)
    assert len(data) == 2 and data.skipped == []
    assert [data.meta(i)["image_id"] for i in range(2)] == [42, 7]  # the questions' order
    sample = data[0]
    assert isinstance(sample, Sample) and sample.image.size == (8, 6) and sample.captions == []
    assert sample.source == str(root / "val2014" / "COCO_val2014_000000000042.jpg")
    first, second = sample.meta["qa"]
    assert first == {
        "question": "Is there a dog?",
        "answer": "yes",
        "answers": ["yes"] * 10,
        "type": "yes/no",
        "question_type": "what is",
        "question_id": 420,
    }
    assert second["answer"] == "brown" and second["answers"][-3:] == ["black and white"] * 3
    assert data.meta(1)["qa"][0]["type"] == "number"
    # open_dataset finds it by VQAv2's file names; "val" names val2014, the default split
    for split in (None, "val", "val2014"):
        found = open_dataset(root, split=split)
        assert [found.meta(i) for i in range(2)] == [data.meta(i) for i in range(2)]
    assert len(open_dataset(root, format="vqav2")) == 2


def test_plain_image_ids_and_other_patterns(tmp_path):
    beside = write_vqav2(tmp_path / "a", name="{image_id}.jpg", folder=None)
    assert [s.source for s in read_vqav2(beside)] == [str(beside / "42.jpg"), str(beside / "7.jpg")]
    elsewhere = write_vqav2(tmp_path / "b", name="img_{image_id}.png", folder="pics")
    data = read_vqav2(elsewhere, image_root=elsewhere / "pics", image_patterns="img_{image_id}.png")
    assert len(data) == 2 and data.skipped == []
    with pytest.raises(ValueError, match="image pattern"):
        read_vqav2(elsewhere, image_patterns="{id}.jpg")


def test_question_without_annotation_is_a_counted_skip(tmp_path):
    questions = [*QUESTIONS, {"image_id": 9, "question": "Why?", "question_id": 90}]
    root = write_vqav2(tmp_path / "vqav2", questions=questions, image_ids=(42, 7, 9))
    data = read_vqav2(root)
    assert len(data) == 2  # image 9 has no question left: not an item
    assert [(s.source, s.reason) for s in data.skipped] == [
        (f"{root / 'v2_OpenEnded_mscoco_val2014_questions.json'}:questions[3]", "missing annotation: question_id 90")
    ]
    assert format_skips(data.skipped).startswith("1 sample skipped: 1 missing annotation")
    with pytest.raises(DataError, match="questions\\[3\\]: missing annotation: question_id 90"):
        read_vqav2(root, strict=True)


def test_a_split_without_annotations_is_refused(tmp_path):
    root = write_vqav2(tmp_path / "vqav2", split="test2015", annotations=None, folder="test2015")
    with pytest.raises(DataError, match="v2_mscoco_test2015_annotations.json: not found; VQA accuracy needs"):
        open_dataset(root, split="test")


def test_bad_records_and_images_are_skipped(tmp_path):
    questions = [
        *QUESTIONS,
        "not an object",
        {"image_id": "42", "question": "Where?", "question_id": 1},
        {"image_id": 42, "question": "Who?", "question_id": 2},
        {"image_id": 5, "question": "What?", "question_id": 3},
    ]
    annotations = [*ANNOTATIONS, annotation(2, 42, ["me"], "other"), annotation(3, 5, ["it"] * 10, "other")]
    root = write_vqav2(tmp_path / "vqav2", questions=questions, annotations=annotations)
    data = read_vqav2(root)
    reasons = [s.reason for s in data.skipped]
    assert reasons[0] == "malformed record: expected a JSON object, got str"
    assert reasons[1].startswith("bad field: 'image_id' must be an integer id")
    assert reasons[2].startswith("bad field: question_id 2: 'answers' must list 2+")
    assert reasons[3].startswith("missing image: ") and reasons[3].endswith("COCO_val2014_000000000005.jpg")
    assert len(data) == 2
    outside = read_vqav2(root, image_patterns="../val2014/COCO_{split}_{image_id:012d}.jpg", image_root=root / "x")
    assert {s.reason.split(":")[0] for s in outside.skipped[-2:]} == {"path outside data set"}
    small = read_vqav2(root, max_pixels=8 * 6 - 1)
    assert isinstance(small[0], Skipped) and small[0].reason.startswith("image too large")


def test_broken_files_are_errors(tmp_path):
    root = write_vqav2(tmp_path / "vqav2")
    (root / "v2_mscoco_val2014_annotations.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_vqav2(root)
    (root / "v2_mscoco_val2014_annotations.json").write_text("[]")
    with pytest.raises(DataError, match="expected VQAv2's {'annotations'"):
        read_vqav2(root)


# ---------------------------------------------------------------------------------------------
# the benchmark's answer normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("  YES!\n", "yes"),
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only "zero".."ten" (and "none") are number words
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("doesnt know", "doesn't know"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("shell", "shell"),  # not "she'll": the table leaves out forms that are words
        ("girl's", "girl's"),  # apostrophes stay
        ("2:50 pm", "2:50 pm"),  # colons stay
        ("100,978", "100978"),  # a comma between digits is removed, no space
        ("3.5", "3.5"),  # a decimal point stays
        ("black-and-white", "black and white"),  # a mark not beside a space becomes one
        ("red, white", "red white"),  # a mark beside a space is removed
        ("1,000 (about)", "1000 about"),  # a comma between digits: every mark is removed
        ("left/right", "left right"),
        ("end. of it", "end of it"),
    ],
)
def test_normalize_official(text, expected):
    assert normalize_official(text) == expected


# ---------------------------------------------------------------------------------------------
# the official accuracy


def test_all_annotators_agree():
    answers = ["yes"] * 10
    assert vqa_answer_score("yes", answers) == 1.0
    # normalised: the evaluation page normalises predictions always (vqaEval.py skips it when
    # all ten agree, which would score "Yes." 0)
    assert vqa_answer_score("Yes.", answers) == 1.0
    assert vqa_answer_score("no", answers) == 0.0


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 0.0),
        # 1 of 10: the 9 subsets that keep it give 1/3, the 1 that drops it 0 -> 9/3/10
        (1, 0.3),
        # 2 of 10: the 8 subsets that keep both give 2/3, the 2 that drop one 1/3
        #          -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6
        (2, 0.6),
        # 3 of 10: the 7 subsets that keep all three give 1, the 3 that drop one 2/3
        #          -> (7 * 1 + 3 * 2/3) / 10 = 0.9
        (3, 0.9),
        # 4 or more: every subset of nine keeps at least 3 -> 1
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_annotator_out(k, expected):
    answers = ["dog"] * k + ["cat"] * (10 - k)
    assert vqa_answer_score("dog", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("two", "2"),  # number words
        ("2", "Two"),
        ("a dog", "dog"),  # articles
        ("dont", "don't"),  # contractions
        ("don't", "dont"),
        ("black-and-white", "black and white"),  # punctuation
        ("1,000", "1000"),
        ("Fire hydrant.", "fire hydrant"),
    ],
)
def test_normalised_forms_match(prediction, answer):
    # 2 of 10 annotators gave it: 0.6 (see above), the same whatever the surface form
    answers = [answer] * 2 + ["something else"] * 8
    assert vqa_answer_score(prediction, answers) == pytest.approx(0.6)


def test_accuracy_overall_and_per_answer_type():
    predictions = ["yes", "no", "2", "three", "brown", "black and white"]
    answer_lists = [
        ["yes"] * 10,  # 1
        ["yes"] * 10,  # 0
        ["2"] * 6 + ["3"] * 4,  # 1
        ["2"] * 8 + ["3"] * 2,  # 3 given by 2 of 10: 0.6
        ["brown"] * 7 + ["black and white"] * 3,  # 1
        ["brown"] * 7 + ["black and white"] * 3,  # 3 of 10: 0.9
    ]
    types = ["yes/no", "yes/no", "number", "number", "other", "other"]
    m = vqa_official_accuracy(predictions, answer_lists, types)
    assert m["accuracy"] == pytest.approx(100 * (1 + 0 + 1 + 0.6 + 1 + 0.9) / 6)
    assert m["n"] == 6
    assert m["accuracy_yes/no"] == pytest.approx(50.0)
    assert m["accuracy_number"] == pytest.approx(80.0)
    assert m["accuracy_other"] == pytest.approx(95.0)
    assert (m["n_yes/no"], m["n_number"], m["n_other"]) == (2, 2, 2)


def test_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="lengths differ"):
        vqa_official_accuracy(["yes"], [["yes"] * 10, ["no"] * 10], ["yes/no"])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_official_accuracy([], [], [])
    with pytest.raises(ValueError, match="1 annotator answers"):  # one answer: use vqa_accuracy
        vqa_official_accuracy(["yes"], [["yes"]], ["yes/no"])


def test_read_and_score_end_to_end(tmp_path):
    data = read_vqav2(write_vqav2(tmp_path / "vqav2"))
    qa = [q for i in range(len(data)) for q in data.meta(i)["qa"]]
    oracle = [q["answer"].upper() + "." for q in qa]  # the most common answer, in another form
    m = vqa_official_accuracy(oracle, [q["answers"] for q in qa], [q["type"] for q in qa])
    assert m["accuracy"] == 100.0 and m["n"] == 3
    assert {k for k in m if k.startswith("n_")} == {"n_yes/no", "n_number", "n_other"}
    # the single-answer metric still scores the same items by exact match
    assert vqa_accuracy(oracle, [q["answer"] for q in qa], [q["type"] for q in qa])["accuracy"] == 100.0
