"""BLIP-2 stage 2: a small OPT trained by vlp on captions, frozen under the Q-Former's visual
prompt; only the Q-Former side learns; cached generation equals the cache-free reference."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import vlp
from vlp.cli import app
from vlp.data.tokenizer import Tokenizer

QFORMER = {"num_queries": 3, "context_length": 32, "width": 32, "layers": 2, "heads": 2, "cross_attention_every": 2}
VISION = {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "heads": 2}


def write(path, recipe, model, shapes_dir, steps=3):
    config = {
        "recipe": recipe,
        "model": model,
        "data": {"path": str(shapes_dir), "batch_size": 8, "workers": 0},
        "train": {"steps": steps, "lr": 1e-3, "warmup": 1, "log_every": 1, "ckpt_every": steps},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, shapes_dir):
    """(stage-1 run, LM directory, stage-2 run) trained for a few steps."""
    root, runner = tmp_path_factory.mktemp("blip2"), CliRunner()

    def train(recipe, config, out, *extra):
        result = runner.invoke(
            app, ["train", recipe, "--config", str(config), "--out", str(root / out), "--no-progress", *extra]
        )
        assert result.exit_code == 0, result.output

    lm_model = {"text": {"context_length": 40, "width": 32, "layers": 2, "heads": 2}}
    train("caption_lm", write(root / "lm.yaml", "caption_lm", lm_model, shapes_dir, steps=20), "lm")
    result = runner.invoke(app, ["convert", str(root / "lm"), str(root / "lm_hf"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    train(
        "blip2_stage1",
        write(root / "s1.yaml", "blip2_stage1", {"vision": VISION, "qformer": QFORMER, "embed_dim": 16}, shapes_dir),
        "s1",
    )
    s2 = write(root / "s2.yaml", "blip2_stage2", {"prompt": ""}, shapes_dir, steps=4)
    train("blip2_stage2", s2, "s2", "--init", str(root / "s1"), "--lm", str(root / "lm_hf"))
    return root / "s1", root / "lm_hf", root / "s2"


def test_the_frozen_lm_is_an_ordinary_transformers_model(stage2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, lm_dir, _ = stage2
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(lm_dir), AutoTokenizer.from_pretrained(lm_dir)
    ids = tokenizer("a small red circle", return_tensors="pt")["input_ids"]
    assert lm(ids).logits.shape == (1, ids.shape[1], tokenizer.vocab_size)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "[PAD]"
    trained = Tokenizer.load(lm_dir.parent / "lm")("a small red circle", style="clip")["input_ids"][0]
    assert ids[0].tolist() == trained.tolist()[:-1]  # framed as in training: the start token, no end token


def test_only_the_qformer_side_learns(stage2):
    s1_dir, lm_dir, s2_dir = stage2
    s1, s2 = vlp.load(s1_dir), vlp.load(s2_dir)
    state = s2.state_dict()
    assert not any(k.startswith("lm.") for k in state)  # the LM is not checkpointed
    assert all(torch.equal(s1.state_dict()[k], state[k]) for k in state if k.startswith("visual."))
    assert not torch.equal(s1.state_dict()["qformer.query_tokens"], state["qformer.query_tokens"])
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    assert all(torch.equal(original[k], v) for k, v in s2.lm.state_dict().items())
    model = s2.train()
    images = torch.randn(2, 3, 32, 32)
    loss = model({"images": images, "texts": ["a red circle", "two shapes"]})["lm"]
    loss.backward()
    learning = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert learning == {"ln_vision", "qformer", "language_projection"}
    assert all(p.grad is None for p in model.lm.parameters())


def test_captions_and_prompted_answers_equal_cache_free_generation(stage2):
    model = vlp.load(stage2[2])
    images = torch.randn(2, 3, 32, 32)
    for prompt in ("", "Question: what color is the circle? Answer:"):
        cached = vlp.caption(model, images, method="greedy", prompt=prompt, max_new_tokens=6)
        uncached = model.caption(images, prompt, "greedy", max_new_tokens=6, use_cache=False)
        assert cached == uncached and len(cached) == 2
    records = [json.loads(line) for line in (stage2[2] / "metrics.jsonl").read_text().splitlines()]
    init = next(r for r in records if r.get("event") == "init")
    assert not [k for k in init["missing"] if k.startswith(("visual.", "qformer."))]


def test_zero_shot_vqa_one_prompt_per_image(stage2, shapes_dir):
    """Questions of different lengths in one batch: each answer equals the one generated alone."""
    from vlp.eval.run import evaluate

    model = vlp.load(stage2[2])
    images = torch.randn(2, 3, 32, 32)
    questions = ["what color is the circle?", "how many shapes are there in this picture?"]
    together = model.answer_texts(images, questions)
    alone = [model.answer_texts(images[i : i + 1], [q])[0] for i, q in enumerate(questions)]
    assert together == alone
    results = evaluate(model, shapes_dir, tasks=["vqa"])
    assert {"accuracy", "accuracy_color"} <= set(results["vqa"])


def test_encoder_decoder_lm_trains_with_the_prefix_lm_loss(tmp_path, stage2, shapes_dir):
    """A T5 (built offline) behind the Q-Former: the caption is split, the prefix goes to the
    encoder with the visual prompt, the decoder learns the suffix; only the Q-Former side learns."""
    from tokenizers import processors
    from transformers import T5Config, T5ForConditionalGeneration

    from vlp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(shapes_dir)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=tokenizer.vocab_size,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            decoder_start_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eot_id,
            pad_token_id=tokenizer.pad_id,
        )
    )
    t5.save_pretrained(tmp_path / "t5")
    library = tokenizer._tok  # T5 style: the end token after every text
    library.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.eot_id)]
    )
    library.save(str(tmp_path / "t5" / "tokenizer.json"))
    (tmp_path / "t5" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "[PAD]"})
    )
    config = write(tmp_path / "t5.yaml", "blip2_stage2", {"lm": str(tmp_path / "t5")}, shapes_dir, steps=3)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "blip2_stage2",
            "--config",
            str(config),
            "--init",
            str(stage2[0]),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    model = vlp.load(tmp_path / "run")
    assert model.lm.config.is_encoder_decoder
    torch.manual_seed(1)
    loss = model.train()({"images": torch.randn(2, 3, 32, 32), "texts": ["a small red circle", "two shapes"]})["lm"]
    loss.backward()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {
        "ln_vision",
        "qformer",
        "language_projection",
    }
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    cached = model.caption(images, "Question: what color is the circle? Answer:", "greedy", max_new_tokens=5)
    assert cached == model.caption(
        images, "Question: what color is the circle? Answer:", "greedy", max_new_tokens=5, use_cache=False
    )


def test_the_caption_lm_learns_every_position_of_its_context():
    """Training puts each text at a random offset (BLIP-2's visual prompt shifts the text right);
    evaluation reads texts from position 0, as transformers does without position ids."""
    torch.manual_seed(0)
    model = vlp.create_model(
        "caption_lm",
        {
            "text": {"vocab_size": 30, "context_length": 16, "width": 16, "layers": 1, "heads": 2},
            "tokens": {"pad": 0, "sot": 1, "eot": 2},
        },
    )
    seen = []
    model.lm.model.decoder.embed_positions.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    ids = torch.randint(3, 30, (64, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()(batch)
    starts = seen[-1][:, 0]
    assert starts.min() >= 0 and starts.max() == 16 - 6 and len(set(starts.tolist())) > 5
    assert (seen[-1] - starts[:, None] == torch.arange(6)).all()
    model.eval()(batch)
    assert (seen[-1] == torch.arange(6)).all()
