"""`vlp eval` on data sets other than the shapes world: image folders, CLIP_benchmark shards,
a user's CSV, COCO-Karpathy JSON; known answers from models that are perfect or constant by
construction, and clear errors for data that cannot serve a task."""

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from test_interop_clip import HF_SHAPES, hf_clip
from typer.testing import CliRunner

from vlp.cli import app
from vlp.data.sample import DataError
from vlp.data.tokenizer import Tokenizer
from vlp.eval.run import evaluate
from vlp.models.recipe import Recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class WordTokenizer:
    """Each text becomes one token: the id of the first colour word it contains."""

    def __call__(self, texts, max_length=None, style=None):
        ids = [next(i for i, word in enumerate(COLOURS) if word in text) for text in texts]
        return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


class ColourOracle(Recipe):
    """Embeds an image by its dominant channel and a text by its colour word: perfect by
    construction on red/green/blue images; with `constant`, every image looks red."""

    eval_tasks = ("zeroshot", "retrieval")

    def __init__(self, constant: bool = False):
        cfg = SimpleNamespace(vision=SimpleNamespace(image_size=16), text=SimpleNamespace(context_length=4))
        super().__init__(cfg, tokenizer=WordTokenizer())
        self.constant = constant
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluation reads the device from a parameter

    def encode_image(self, images):
        channel = images.mean(dim=(2, 3)).argmax(dim=1)
        return F.one_hot(torch.zeros_like(channel) if self.constant else channel, 3).float()

    def encode_text(self, input_ids, attention_mask):
        return F.one_hot(input_ids[:, 0], 3).float()


def image(colour: str, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[colour])


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    for colour, n in counts.items():
        (root / colour).mkdir(parents=True)
        for i in range(n):
            image(colour).save(root / colour / f"{i}.png")
    return root


def test_a_perfect_model_scores_100_and_a_constant_one_scores_chance(tmp_path):
    data = image_folder(tmp_path / "val", {"red": 2, "green": 3, "blue": 5})
    perfect = evaluate(ColourOracle(), data, tasks=["zeroshot"])["zeroshot"]
    assert perfect == {"top1": 100.0, "top5": 100.0, "mean_per_class_recall": 100.0}
    constant = evaluate(ColourOracle(constant=True), data, tasks=["zeroshot"])["zeroshot"]
    assert constant["top1"] == pytest.approx(20.0)  # the 2 red images of 10
    assert constant["mean_per_class_recall"] == pytest.approx(100 / 3)  # red all right, the others none
    assert constant["top5"] == 100.0  # 3 classes: all in the top 5


def test_clip_benchmark_shards_with_class_names_and_templates(tmp_path):
    """CLIP_benchmark's layout: test/*.tar with <key>.webp + <key>.cls, classnames.txt and
    zeroshot_classification_templates.txt ({c}) beside them."""
    (tmp_path / "test").mkdir()
    names = ["blue", "red", "green"]  # class ids follow the file, not alphabetical order
    with wds.TarWriter(str(tmp_path / "test" / "0.tar")) as sink:
        for i, name in enumerate(["red", "green", "blue", "blue"]):
            webp = io.BytesIO()
            image(name).save(webp, format="WEBP", lossless=True)
            sink.write({"__key__": f"s{i}", "webp": webp.getvalue(), "cls": str(names.index(name))})
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c} thing.\n")
    results = evaluate(ColourOracle(), tmp_path)
    assert results["zeroshot"]["top1"] == 100.0 and "retrieval" not in results  # no captions


def test_retrieval_and_errors_for_tasks_the_data_cannot_serve(tmp_path):
    data = image_folder(tmp_path / "val", {"red": 1, "green": 1})
    with pytest.raises(DataError, match="--tasks retrieval need.*captions"):
        evaluate(ColourOracle(), data, tasks=["retrieval"])
    with pytest.raises(DataError, match="'green'.*not in the class_names given"):
        evaluate(ColourOracle(), data, tasks=["zeroshot"], classes=["red", "blue"])  # green missing
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable sample"):
        evaluate(ColourOracle(), tmp_path / "empty.jsonl", tasks=["retrieval"])


def test_a_csv_with_a_label_column(tmp_path):
    (tmp_path / "images").mkdir()
    rows = ["filepath,kind"]
    for i, colour in enumerate(["red", "green", "blue", "blue"]):
        image(colour).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{colour}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    results = evaluate(ColourOracle(), tmp_path / "set.csv", label_key="kind", classes=["red", "green", "blue"])
    assert results["zeroshot"]["top1"] == 100.0


def write_karpathy(root: Path, colours: list[str]) -> Path:
    """A COCO-Karpathy file: images listed with their split and five captions each."""
    (root / "images").mkdir(parents=True)
    records = []
    for i, colour in enumerate(colours):
        image(colour, 32).save(root / "images" / f"{i}.png")
        sentences = [{"raw": f"a {colour} square number {j}"} for j in range(5)]
        records.append(
            {"filepath": "images", "filename": f"{i}.png", "split": "test", "imgid": i, "sentences": sentences}
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": records}))
    return path


def test_flickr_style_karpathy_json_with_images_elsewhere(tmp_path):
    """Flickr30k's Karpathy file names only file names: --image-root says where they are."""
    karpathy = write_karpathy(tmp_path / "flickr", ["red", "green", "blue"])
    records = json.loads(karpathy.read_text())
    for record in records["images"]:
        del record["filepath"]
    karpathy.write_text(json.dumps(records))
    with pytest.raises(DataError, match="no usable sample"):
        evaluate(CaptionOracle(), karpathy)
    results = evaluate(CaptionOracle(), karpathy, image_root=tmp_path / "flickr" / "images")
    assert results["caption"]["cider"] > 0


def test_a_converted_transformers_checkpoint_on_karpathy_json_from_the_command_line(tmp_path, shapes_dir):
    tokenizer = Tokenizer.load(shapes_dir / "tokenizer.json")
    hf_clip(HF_SHAPES[0], tokenizer.vocab_size, tokenizer.eot_id).save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    karpathy = write_karpathy(tmp_path / "coco", ["red", "green", "blue", "red"])
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(karpathy), "--no-report"])
    assert result.exit_code == 0, result.output
    retrieval = json.loads((tmp_path / "hf" / "eval.json").read_text())["retrieval"]
    assert 0 <= retrieval["i2t_R@1"] <= retrieval["i2t_R@10"] == 100.0  # 20 captions, 4 images
    assert retrieval["t2i_R@5"] == 100.0  # every image is within the 5 best of 4


def test_a_clip_trained_on_a_csv_set_evaluates_on_an_image_folder(tmp_path):
    """A user's own data: train a CLIP on a CSV of photos and captions (60 steps learn the three
    colours), then classify a held-out image folder with class names given on the command line,
    through `vlp eval` and through `vlp classify`."""
    (tmp_path / "photos").mkdir()
    rows = ["filepath,title"]
    for i in range(48):
        colour = list(COLOURS)[i % 3]
        image(colour, 32).save(tmp_path / "photos" / f"{i}.png")
        rows.append(f"photos/{i}.png,a {colour} photo")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    image_folder(tmp_path / "held_out", {"red": 2, "green": 2, "blue": 2})
    model = {
        "embed_dim": 16,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2},
    }
    common = [sys.executable, "-m", "vlp.cli"]
    train = [
        *common,
        "train",
        "clip",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "60",
        "--no-progress",
        "data.batch_size=24",
        "data.workers=0",
        "train.warmup=5",
        "train.lr=3e-3",
        *[f"model.{k}={json.dumps(v)}" for k, v in model.items()],
    ]
    assert subprocess.run(train, capture_output=True, text=True).returncode == 0
    evaluate_cmd = [
        *common,
        "eval",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "held_out"),
        "--classes",
        "red,green,blue",
        "--no-report",
    ]
    result = subprocess.run(evaluate_cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    zeroshot = json.loads((tmp_path / "run" / "eval.json").read_text())["zeroshot"]
    assert zeroshot == {"top1": 100.0, "top5": 100.0, "mean_per_class_recall": 100.0}
    classified = subprocess.run(
        [*common, "classify", str(tmp_path / "run"), str(tmp_path / "held_out"), "--labels", "red,green,blue"],
        capture_output=True,
        text=True,
    )
    lines = [line.split("\t") for line in classified.stdout.splitlines()]
    assert len(lines) == 6 and all(Path(path).parent.name == labels.split()[0] for path, labels in lines)
    wrong = subprocess.run(
        [*evaluate_cmd[:-3], "--classes", "red,green", "--no-report"], capture_output=True, text=True
    )
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ") and "'blue'" in wrong.stderr


class CaptionOracle(ColourOracle):
    """Captions an image by its dominant colour."""

    eval_tasks = ("caption",)
    can_caption = True

    def caption(self, images, prompt=None, method="beam", **options):
        return [f"a {list(COLOURS)[c]} square" for c in self.encode_image(images).argmax(dim=1).tolist()]


def test_captioning_on_karpathy_references_equals_pycocoevalcap(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    karpathy = write_karpathy(tmp_path, ["red", "green", "blue", "red"])
    metrics = evaluate(CaptionOracle(), karpathy)["caption"]
    colours = ["red", "green", "blue", "red"]
    gts = {i: [f"a {c} square number {j}" for j in range(5)] for i, c in enumerate(colours)}
    res = {i: [f"a {c} square"] for i, c in enumerate(colours)}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [metrics[f"bleu{n}"] for n in range(1, 5)] == pytest.approx([100 * b for b in bleu])
    assert metrics["rouge_l"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])
    assert metrics["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert any(line.startswith("spice: ") for line in metrics["skipped"]) or "spice" in metrics


class AnswerOracle(ColourOracle):
    """Answers from a fixed table of question -> answer: the official accuracy is known."""

    eval_tasks = ("vqa",)
    ANSWERS = {"Is there a dog?": "Yes.", "How many cats are there?": "three", "What colour is the dog?": "black"}

    def answer_texts(self, images, questions):
        return [self.ANSWERS[q] for q in questions]


def test_vqa_on_vqav2_files_scores_the_official_accuracy(tmp_path):
    from test_eval_vqa import write_vqav2

    data = write_vqav2(tmp_path / "vqa")
    vqa = evaluate(AnswerOracle(), data)["vqa"]
    # "Yes." against ten "yes": 1; "three" = "3", given by 4 of 10: 1; "black" by none: 0.
    assert vqa["accuracy"] == pytest.approx(100 * 2 / 3)
    assert vqa["accuracy_yes/no"] == 100.0 and vqa["accuracy_number"] == 100.0 and vqa["accuracy_other"] == 0.0
