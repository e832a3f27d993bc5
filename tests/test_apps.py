"""The applications on one's own images: `vlp classify` / `vlp.classify`, `vlp caption` over
folders, `vlp ask`, and the error a model without the ability gets."""

import json

import pytest
import torch
from conftest import tiny_clip
from test_eval_any_data import ColourOracle, image, image_folder
from typer.testing import CliRunner

import vlp
from vlp.apps.ability import require
from vlp.apps.inputs import read_images
from vlp.cli import app


class ScaledOracle(ColourOracle):
    def scale(self):
        return torch.tensor(100.0)


def test_classify_ranks_the_true_label_first_with_softmax_probabilities():
    images = [image("blue"), image("red")]
    results = vlp.classify(ScaledOracle(), images, ["red", "green", "blue"], top_k=2)
    assert [labels[0][0] for labels in results] == ["blue", "red"]
    for labels in results:
        assert labels[0][1] == pytest.approx(1.0, abs=1e-6) and labels[0][1] >= labels[1][1]
        assert len(labels) == 2


def test_classify_in_bf16_agrees_with_fp32(shapes_dir):
    """--precision bf16 (what auto picks where bf16 is faster) runs the image encoder under
    autocast: the same top labels, probabilities within bf16's rounding."""
    model = tiny_clip(shapes_dir)
    images = [image(colour, 32) for colour in ("red", "green", "blue")]
    labels = ["a red circle", "a green square", "a blue triangle"]
    fp32 = vlp.classify(model, images, labels, top_k=3, precision="fp32")
    bf16 = vlp.classify(model, images, labels, top_k=3, precision="bf16")
    assert [r[0][0] for r in fp32] == [r[0][0] for r in bf16] and fp32 != bf16  # bf16 did run
    for a, b in zip(fp32, bf16):
        assert dict(a) == pytest.approx(dict(b), abs=0.02)


def test_inputs_walk_folders_and_report_bad_files(tmp_path):
    folder = image_folder(tmp_path / "photos", {"red": 1, "green": 1})
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    found = dict(read_images([folder, tmp_path / "gone.jpg"]))
    assert sorted(p.rsplit("/", 1)[-1] for p in found) == ["0.png", "0.png", "broken.png", "gone.jpg"]
    assert found[str(folder / "broken.png")].reason.startswith("corrupt image")
    assert found[str(tmp_path / "gone.jpg")].reason.startswith("missing image")


def test_classify_command_over_a_folder_writes_jsonl(tmp_path, shapes_dir):
    model = tiny_clip(shapes_dir)
    run = vlp.save(model, tmp_path / "run")
    folder = image_folder(tmp_path / "photos", {"red": 2, "blue": 1})
    (folder / "bad.png").write_bytes(b"nope")
    result = CliRunner().invoke(
        app,
        ["classify", str(run), str(folder), "--labels", "a red shape,a blue shape", "--out", str(tmp_path / "o.jsonl")],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(sum(p for _, p in line["labels"]) == pytest.approx(1.0) for line in lines)
    assert "skipped" in result.stderr and "bad.png" in result.stderr


def test_a_model_without_the_ability_is_told_which_recipes_have_it(shapes_dir):
    with pytest.raises(TypeError, match="cannot answer questions; recipes that can: blip2_stage2, blip_vqa"):
        require(tiny_clip(shapes_dir), "ask")
    with pytest.raises(TypeError, match="cannot caption images; recipes that can: .*blip.*coca"):
        require(tiny_clip(shapes_dir), "caption")


def test_ask_and_caption_commands(tmp_path):
    """Tiny BLIP VQA and BLIP models with random weights: any answer or caption will do."""
    from tests.test_fusion_models import TEXT, model_config
    from vlp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["what colour is the square", "a red circle"], vocab_size=60)
    text = {**TEXT, "vocab_size": tokenizer.vocab_size}
    runs = {}
    for recipe in ("blip_vqa", "blip"):
        torch.manual_seed(0)
        vqa = {"share_decoder": False, "objectives": ["lm"]} if recipe == "blip_vqa" else {}
        config = model_config(recipe, text=text, tokens=tokenizer.special_ids(), **vqa)
        runs[recipe] = vlp.save(vlp.create_model(recipe, config, tokenizer=tokenizer), tmp_path / recipe)
    photo = tmp_path / "photo.png"
    image("red", 32).save(photo)
    runner = CliRunner()
    result = runner.invoke(app, ["ask", str(runs["blip_vqa"]), str(photo), "what colour is the square?"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1, result.output
    folder = image_folder(tmp_path / "photos", {"red": 2, "green": 1})
    out = tmp_path / "captions.jsonl"
    result = runner.invoke(app, ["caption", str(runs["blip"]), str(folder), "--decoding", "greedy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    captions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["path"] for c in captions] == sorted(str(p) for p in folder.rglob("*.png"))
    assert all(isinstance(c["caption"], str) for c in captions)
