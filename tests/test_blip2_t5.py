"""BLIP-2 stage 2 with an encoder-decoder LM (the "Salesforce/blip2-flan-t5-xl" layout: a gated-GELU
T5 with untied output layer), loaded from transformers: equal logits and losses, the prefix LM
loss of Sec. 3.3, a training step that moves only the Q-Former side, captions equal to
transformers' `generate`, and saving back. A tiny random model with odd sizes, built offline."""

import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file
from tokenizers import processors

import vlp
from vlp.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

QUERIES = 5
QUESTION = "Question: what color is the circle? Answer:"


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at random, norm scales around 1 (transformers' init is near zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (p.ndim == 1 and name.endswith("weight")))
    return model.eval()


@pytest.fixture(scope="module")
def t5_blip2(tmp_path_factory, shapes_dir):
    """(checkpoint directory, the transformers model, the image token id)."""
    path = tmp_path_factory.mktemp("blip2_t5")
    tokenizer = Tokenizer.load(shapes_dir)
    t5 = transformers.T5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=30,
        d_kv=7,  # 3 heads of 7: the attention width (21) is not the model's
        d_ff=46,
        num_layers=2,
        num_decoder_layers=1,
        num_heads=3,
        feed_forward_proj="gated-gelu",  # Flan-T5
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
    )
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3)
        | dict(image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=30, intermediate_size=46, num_hidden_layers=3, num_attention_heads=3)
        | dict(encoder_hidden_size=36),
        text_config=t5.to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=tokenizer.mask_id,
    )
    hf = randomise(transformers.Blip2ForConditionalGeneration(config))
    hf.save_pretrained(path)
    library = tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())  # T5 style: the end token after every text
    library.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.eot_id)]
    )
    library.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "[PAD]"})
    )
    return path, hf, tokenizer.mask_id


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def with_queries(ids: torch.Tensor, mask: torch.Tensor, image_token: int) -> dict[str, torch.Tensor]:
    """transformers' encoder input: the image token for each query, then the text."""
    queries = torch.full((len(ids), QUERIES), image_token)
    return {"input_ids": torch.cat([queries, ids], 1), "attention_mask": torch.cat([torch.ones_like(queries), mask], 1)}


def targets(model, texts: list[str]) -> torch.Tensor:
    ids, mask = model._token_ids(texts, eos=True)
    return ids.masked_fill(mask == 0, -100)


def test_t5_checkpoint_loads_with_equal_logits(t5_blip2):
    path, hf, image_token = t5_blip2
    model = vlp.load(path)
    assert model.recipe == "blip2_stage2" and model.lm.config.is_encoder_decoder
    assert model.cfg.image_token == image_token
    ids, mask = model._token_ids(["a small", "two blue squares and"], eos=False)  # right-padded prefixes
    labels = targets(model, ["red circle", "a green one"])
    with torch.no_grad():
        ours = model.lm_output(images(), ids, mask, labels=labels)
        theirs = hf(pixel_values=images(), **with_queries(ids, mask, image_token), labels=labels)
    assert ours.logits.shape == (2, labels.shape[1], model.lm.config.vocab_size) and ours.logits.std() > 0.1
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_prefix_lm_loss_is_the_loss_of_the_split_caption(t5_blip2):
    """A two-word caption splits after its first word: the encoder reads the visual prompt and
    "red", the decoder is scored on "circle" (Sec. 3.3). Without `split_captions` the encoder
    reads the visual prompt and `prompt`, and the whole caption is the target."""
    path, hf, image_token = t5_blip2
    model = vlp.load(path)
    pixels = images(1)

    def hf_loss(encoder_text: str, target: str) -> torch.Tensor:
        ids, mask = model._token_ids([encoder_text], eos=False)
        return hf(pixel_values=pixels, **with_queries(ids, mask, image_token), labels=targets(model, [target])).loss

    with torch.no_grad():
        loss = model({"images": pixels, "texts": ["red circle"]})["lm"]
        torch.testing.assert_close(loss, hf_loss("red", "circle"), atol=1e-5, rtol=0)
        model.cfg.split_captions, model.cfg.prompt = False, "a photo of"
        loss = model({"images": pixels, "texts": ["a red circle"]})["lm"]
        torch.testing.assert_close(loss, hf_loss("a photo of", "a red circle"), atol=1e-5, rtol=0)


def test_a_training_step_moves_only_the_qformer_side(t5_blip2):
    path, _, _ = t5_blip2
    model = vlp.load(path).train()
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    queries_before = model.qformer.query_tokens.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model({"images": images(), "texts": ["a small red circle", "two blue squares and a green one"]})["lm"]
    assert torch.isfinite(loss)
    loss.backward()
    learning = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert learning == {"ln_vision", "qformer", "language_projection"}
    assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())
    optimizer.step()
    assert not torch.equal(model.qformer.query_tokens, queries_before)
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    assert all(torch.equal(v, vision_before[k]) for k, v in model.visual.state_dict().items())


@pytest.mark.parametrize("prompt", ["", QUESTION])
def test_captions_equal_transformers_generate(t5_blip2, prompt):
    path, hf, image_token = t5_blip2
    model = vlp.load(path)
    captions = model.caption(images(), prompt, "greedy", max_new_tokens=6)
    ids, mask = model._token_ids([prompt] * 2, eos=False)
    with torch.no_grad():
        out = hf.generate(images(), **with_queries(ids, mask, image_token), max_new_tokens=6, do_sample=False)
    expected = [t.strip() for t in model.lm_tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert captions == expected and all(isinstance(c, str) for c in captions)
    assert any(captions), "random weights still produce words"


def test_t5_model_saves_back_to_transformers(t5_blip2, tmp_path):
    """HF -> vlp -> HF: bit-equal weights (the untied output layer and both embeddings too),
    and transformers reads the written directory with its LM tokenizer."""
    path, hf, image_token = t5_blip2
    vlp.save(vlp.load(path), tmp_path, format="hf")
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.text_config.model_type == "t5" and again.config.image_token_index == image_token
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("a red circle")["input_ids"][-1] == tok.eos_token_id


def test_batched_prompts_of_different_lengths_answer_as_alone(t5_blip2):
    """The encoder's prompts are right-padded, so the text sits right after the visual prompt
    whatever the batch: each answer equals the one generated alone."""
    model = vlp.load(t5_blip2[0])
    questions = ["what color is the circle?", "how many shapes are there in this picture?"]
    together = model.answer_texts(images(), questions)
    assert together == [model.answer_texts(images()[i : i + 1], [q])[0] for i, q in enumerate(questions)]
