"""Zero-shot classification on any labelled data set: the metrics (vlp.eval.zeroshot) against
known answers, and the labels, class names and templates the readers give (vlp.data.formats),
in CLIP_benchmark's webdataset layout, CSV, JSONL and image folders."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from vlp.data.formats import (
    class_labels,
    open_dataset,
    read_class_names,
    read_csv,
    read_image_folder,
    read_jsonl,
    read_templates,
    read_webdataset,
)
from vlp.data.sample import DataError, Sample
from vlp.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zeroshot_accuracy, zeroshot_metrics

# ---------------------------------------------------------------------------------------------
# metrics: known answers


def unit_rows(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_perfect_embeddings_score_100_everywhere() -> None:
    """Image i's embedding is its class's embedding: every metric is 100."""
    classes = unit_rows(7)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 6, 6])
    metrics = zeroshot_metrics(classes[labels], labels, classes)
    assert metrics == pytest.approx({"top1": 100.0, "top5": 100.0, "mean_per_class_recall": 100.0})
    assert zeroshot_accuracy(classes[labels], labels, classes) == pytest.approx(100.0)


def test_constant_predictor_on_an_imbalanced_set() -> None:
    """Every image predicted as class 0, which holds 6 of 10 images: top-1 is the majority's
    share, the mean per-class recall is 100 / C (C = 4 classes present; class 4 has no image
    and does not count), and top-5 of 5 classes is 100."""
    classes = unit_rows(5)
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] + [3])
    images = classes[0].expand(len(labels), -1)
    metrics = zeroshot_metrics(images, labels, classes)
    assert metrics == pytest.approx({"top1": 60.0, "top5": 100.0, "mean_per_class_recall": 25.0})
    assert zeroshot_accuracy(images, labels, classes) == pytest.approx(metrics["top1"])


def test_top5_counts_the_five_best_and_at_most_all_classes() -> None:
    # one image, 8 classes; class 3 is ranked third, class 2 last
    scores = torch.tensor([[0.9, 0.8, -1.0, 0.7, 0.6, 0.5, 0.4, 0.0]])

    def scored(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return scores

    metrics = zeroshot_metrics(torch.zeros(1, 2), torch.tensor([3]), torch.zeros(8, 2), scored)
    assert metrics == {"top1": 0.0, "top5": 100.0, "mean_per_class_recall": 0.0}
    metrics = zeroshot_metrics(torch.zeros(1, 2), torch.tensor([2]), torch.zeros(8, 2), scored)
    assert metrics["top5"] == 0.0
    # 3 classes: top-5 is top-3, so always right, whatever the scores
    classes, labels = unit_rows(3), torch.tensor([0, 1, 2, 2])
    wrong = classes[(labels + 1) % 3]
    assert zeroshot_metrics(wrong, labels, classes) == pytest.approx(
        {"top1": 0.0, "top5": 100.0, "mean_per_class_recall": 0.0}
    )


def test_the_recipes_similarity_is_used() -> None:
    """`similarity` decides the ranking (BLIP-2 scores by a max over query tokens): with the
    dot product negated, perfect embeddings are never predicted right."""
    classes = unit_rows(4)
    labels = torch.tensor([0, 1, 2, 3])
    metrics = zeroshot_metrics(classes[labels], labels, classes, lambda i, c: -(i @ c.T))
    assert metrics["top1"] == 0.0 and metrics["mean_per_class_recall"] == 0.0


def test_class_embeddings_default_templates_and_file_templates(tmp_path: Path) -> None:
    prompts_seen: list[list[str]] = []

    def embed(prompts: list[str]) -> torch.Tensor:
        prompts_seen.append(prompts)
        return unit_rows(len(prompts))

    names = ["cat", "dog"]
    emb = class_embeddings(embed, names)
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert prompts_seen[-1] == [t.format(n) for n in names for t in DEFAULT_TEMPLATES]
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    path = tmp_path / "zeroshot_classification_templates.txt"
    path.write_text("a photo of a {c}.\n\nart of {c} {with braces}\n{c} or {c}?\nvlp style {}\n")
    templates = read_templates(path)
    class_embeddings(embed, names, templates)
    assert prompts_seen[-1][:4] == ["a photo of a cat.", "art of cat {with braces}", "cat or cat?", "vlp style cat"]


# ---------------------------------------------------------------------------------------------
# readers: labels, class names, templates


def image_bytes(seed: int, format: str = "PNG") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    """A shard written by the `webdataset` library, as CLIP_benchmark writes its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


NAMES = ["airplane", "cat", "dog"]


def clip_benchmark_layout(root: Path, labels: list[int]) -> Path:
    """CLIP_benchmark's webdataset layout: root/test/{0,1}.tar holding `<key>.webp`/`.png` and
    `<key>.cls` (the class id as text) and no caption; classnames.txt and the templates beside
    the split folder."""
    for shard in range(2):
        samples = []
        for i in range(shard, len(labels), 2):
            image = {"webp": image_bytes(i, "WEBP")} if i % 2 else {"png": image_bytes(i)}
            samples.append({"__key__": f"s{i:06d}", **image, "cls": f"{labels[i]}\n".encode()})
        write_tar(root / "test" / f"{shard}.tar", samples)
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} in the wild.\n")
    return root


def test_clip_benchmark_webdataset(tmp_path: Path) -> None:
    root = clip_benchmark_layout(tmp_path / "wds_tiny", [2, 0, 1, 1, 2])
    ds = open_dataset(root, split="test")
    assert len(ds) == 5 and ds.skipped == []
    assert ds.classes == NAMES and ds.classes_file == str(root / "classnames.txt")
    assert ds.templates == ["a photo of a {}.", "a {} in the wild."]
    assert [ds.meta(i) for i in range(len(ds))] == [{"label_id": i} for i in (2, 1, 2, 0, 1)]  # shard 0, then 1
    assert class_labels(ds) == ([2, 1, 2, 0, 1], NAMES)
    item = ds[3]
    assert isinstance(item, Sample) and item.captions == [] and item.image.size == (6, 5)  # a .webp


def test_webdataset_label_in_json_and_caption_optional(tmp_path: Path) -> None:
    samples = [
        {"__key__": "a", "png": image_bytes(0), "json": b'{"label": "dog", "source": "web"}'},
        {"__key__": "b", "png": image_bytes(1), "json": b'{"label": 1, "caption": "a cat on a mat"}'},
        {"__key__": "c", "png": image_bytes(2), "txt": b"a caption only"},
        {"__key__": "d", "png": image_bytes(3)},  # neither caption nor label: still skipped
        {"__key__": "e", "png": image_bytes(4), "json": b'{"label": ["dog"]}'},
    ]
    shard = write_tar(tmp_path / "d.tar", samples)
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    ds = read_webdataset(shard)
    assert [ds.meta(i) for i in range(len(ds))] == [{"label": "dog", "source": "web"}, {"label_id": 1}, {}]
    assert [ds.captions(i) for i in range(len(ds))] == [[], ["a cat on a mat"], ["a caption only"]]
    assert {s.source: s.reason.split(":")[0] for s in ds.skipped} == {
        f"{shard}#d": "missing field",
        f"{shard}#e": "bad label",
    }
    with pytest.raises(DataError, match=f"{shard}#c has no label"):
        class_labels(ds)  # the captioned item has no label


def test_csv_with_a_label_column(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    table = tmp_path / "test.csv"
    table.write_text("filepath,label\n0.png,dog\n1.png,cat\n2.png,dog\n3.png,\n")
    ds = read_csv(table, label_key="label")  # no caption column
    assert [ds.meta(i) for i in range(len(ds))] == [{"label": "dog"}, {"label": "cat"}, {"label": "dog"}]
    assert ds.classes == ["cat", "dog"] and ds.classes_file is None  # sorted names, as folders
    assert class_labels(ds) == ([1, 0, 1], ["cat", "dog"])
    assert [(s.source, s.reason.split(":")[0]) for s in ds.skipped] == [(f"{table}:5", "bad label")]
    # integer ids, captions kept where present, class names in the parent folder
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    table = data / "test.tsv"
    table.write_text("filepath\ttitle\tcls\n0.png\t\t2\n1.png\ta cat\t1\n1.png\tstill a cat\t1\n")
    ds = open_dataset(data, split="test", label_key="cls")
    assert [ds.captions(i) for i in range(len(ds))] == [[], ["a cat", "still a cat"]]
    assert class_labels(ds) == ([2, 1], NAMES) and ds.templates == []
    with pytest.raises(DataError, match="missing column 'label'"):
        read_csv(table, label_key="label")


def test_jsonl_with_a_label_field(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n\n")
    lines = [
        {"image": "0.png", "class": "cat", "caption": "a cat"},
        {"image": "1.png", "class": 0},
        {"image": "2.png", "class": "2"},
        {"image": "2.png", "caption": "no label"},
    ]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ds = read_jsonl(path, label_key="class")
    assert [ds.meta(i) for i in range(len(ds))] == [{"label": "cat"}, {"label_id": 0}, {"label_id": 2}]
    assert ds.captions(0) == ["a cat"] and ds.captions(1) == []
    assert class_labels(ds) == ([1, 0, 2], NAMES)
    assert [(s.source, s.reason) for s in ds.skipped] == [(f"{path}:4", "missing field: 'class'")]
    # without label_key nothing changes: a caption is required
    assert len(read_jsonl(path)) == 2


# ---------------------------------------------------------------------------------------------
# bad input


def test_a_label_outside_classnames_is_an_error_naming_it(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    table = tmp_path / "test.csv"
    table.write_text("filepath,label\n0.png,cat\n1.png,zebra\n2.png,zebra\n")
    ds = read_csv(table, label_key="label")
    names = tmp_path / "classnames.txt"
    where = re.escape(f"{table}: {tmp_path / '1.png'} has label 'zebra', not in {names} (3 classes)")
    message = rf"^{where}; 2 item\(s\), 1 distinct label\(s\) do not match$"
    with pytest.raises(DataError, match=message):
        class_labels(ds)
    assert class_labels(ds, ["cat", "zebra"]) == ([0, 1, 1], ["cat", "zebra"])  # names given
    root = clip_benchmark_layout(tmp_path / "wds", [0, 3])  # id 3: classnames.txt has 3 lines
    with pytest.raises(DataError, match=r"1.tar#s000001 has label id 3, not in .*classnames.txt \(3 classes\)"):
        class_labels(open_dataset(root, split="test"))


def test_an_empty_class_folder_is_recorded_by_name(tmp_path: Path) -> None:
    for name, seed in (("cat", 0), ("dog", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.png").write_bytes(image_bytes(seed))
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "notes.txt").write_text("no images here")
    ds = read_image_folder(tmp_path)
    assert ds.classes == ["bird", "cat", "dog"] and len(ds) == 2  # ids stay those of every split
    reasons = [(s.source, s.reason) for s in ds.skipped]
    assert reasons[0] == (str(tmp_path / "bird"), "empty class: no image file in class folder 'bird' (id 0)")
    assert class_labels(ds) == ([1, 2], ["bird", "cat", "dog"])
    with pytest.raises(DataError, match=r"bird: empty class"):
        read_image_folder(tmp_path, strict=True)


def test_image_folder_with_class_names_beside_it(tmp_path: Path) -> None:
    """ImageNet's folders are WordNet ids; classnames.txt names them in sorted folder order."""
    for wnid, seed in (("n02", 0), ("n01", 1)):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "x.png").write_bytes(image_bytes(seed))
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
    ds = open_dataset(tmp_path, split="val")
    assert ds.classes == ["tench", "goldfish"]
    assert class_labels(ds) == ([0, 1], ["tench", "goldfish"])


def test_class_name_and_template_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    names = tmp_path / "files" / "classnames.txt"
    names.write_text("cat\n\ndog\n")
    with pytest.raises(DataError, match=r"classnames.txt:2: blank line"):
        read_class_names(names)
    names.write_bytes(b"cat\n\xff\n")
    with pytest.raises(DataError, match="classnames.txt: not UTF-8"):
        read_class_names(names)
    names.write_text("crane\ncrane\n")  # a repeated name is allowed; a name resolves to its first id
    assert read_class_names(names) == ["crane", "crane"]
    templates = tmp_path / "files" / "t.txt"
    templates.write_text("a photo of a {c}.\na photo of a cat.\n")
    with pytest.raises(DataError, match=r"t.txt:2: template 'a photo of a cat.' has no \{c\} or \{\} placeholder"):
        read_templates(templates)
    templates.write_text("{} and {}\n")
    with pytest.raises(DataError, match="t.txt:1: template"):
        read_templates(templates)
    with pytest.raises(DataError, match="no class names"):
        class_labels(
            read_webdataset(write_tar(tmp_path / "x" / "s.tar", [{"__key__": "a", "png": image_bytes(0), "cls": b"0"}]))
        )
