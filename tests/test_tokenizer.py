"""The text tokenizer: training, framing styles, truncation, padding, save/load, pickling."""

import itertools
import json
import pickle

import pytest
import tokenizers
import torch
from tokenizers import models, normalizers, pre_tokenizers

from vlp.data.sample import DataError
from vlp.data.tokenizer import CLS, EOT, PAD, SEP, SOT, SPECIAL_TOKENS, UNK, Tokenizer

SIZES = ["small", "large"]
COLOURS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["left of", "right of", "above", "below"]


def captions() -> list[str]:
    """About 50 shapes-world captions, e.g. "a small red circle left of a large blue square"."""
    objects = [f"{s} {c} {sh}" for s, c, sh in itertools.product(SIZES, COLOURS, SHAPES)]
    pairs = zip(objects, reversed(objects), itertools.cycle(RELATIONS))
    return [f"a {a} {rel} a {b}" for a, b, rel in pairs] + [f"a {obj}" for obj in objects[:20]]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(captions(), vocab_size=4096)


def test_special_tokens_come_first_with_pad_zero(tok):
    ids = [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.enc_id, tok.dec_id, tok.sot_id, tok.eot_id]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_id == 0
    assert len(SPECIAL_TOKENS) < tok.vocab_size < 4096  # a small corpus gives a small vocabulary


def test_training_twice_gives_the_same_vocabulary(tok):
    """The library's trainer numbers subword pieces in hash-map order (tokenizers #1794): without
    vlp's fix nearly every training of this corpus gives another vocabulary."""
    vocabulary = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    for _ in range(4):
        again = Tokenizer.train(captions(), vocab_size=4096)
        assert [again.id_to_token(i) for i in range(again.vocab_size)] == vocabulary
    # the pieces reserved for training are ordinary tokens: decoding does not skip them
    assert tok.decode([vocabulary.index("a"), vocabulary.index("##a")]) == "aa"


def test_round_trip_is_lowercased_without_accents(tok):
    batch = tok("A Small RED Círcle left of a large blue square")
    assert tok.decode(batch["input_ids"][0]) == "a small red circle left of a large blue square"
    assert tok.decode(batch["input_ids"][0].tolist()) == "a small red circle left of a large blue square"


def test_clip_style_frames_with_sot_and_eot(tok):
    ids = tok("a red circle", style="clip")["input_ids"][0].tolist()
    words = tok("a red circle", style="bert")["input_ids"][0].tolist()[1:-1]
    assert ids == [tok.sot_id, *words, tok.eot_id]
    assert tok.decode(ids, skip_special=False) == f"{SOT} a red circle {EOT}"


def test_bert_style_frames_with_cls_and_sep(tok):
    ids = tok("a red circle", style="bert")["input_ids"][0].tolist()
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert tok.decode(ids, skip_special=False) == f"{CLS} a red circle {SEP}"


def test_batch_pads_to_longest_and_mask_marks_real_tokens(tok):
    texts = ["a circle", "a small red circle left of a large blue square"]
    lengths = [tok(t)["input_ids"].shape[1] for t in texts]
    batch = tok(texts, max_length=64)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = batch["input_ids"][0]
    assert short[lengths[0] - 1] == tok.eot_id
    assert (short[lengths[0] :] == tok.pad_id).all()
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != tok.pad_id)


def test_pad_to_max_gives_max_length(tok):
    batch = tok(["a circle", "a red square"], max_length=16, pad_to_max=True)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [4, 5]  # sot a circle eot / sot a red square eot


@pytest.mark.parametrize("style", ["clip", "bert"])
def test_truncation_keeps_the_end_token(tok, style):
    text = "a small red circle left of a large blue square"
    full = tok(text, style=style)["input_ids"][0].tolist()
    batch = tok([text, "a circle"], max_length=6, style=style)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0].tolist() == full[:5] + [full[-1]]
    assert batch["attention_mask"][0].tolist() == [1] * 6


def test_unknown_words_become_subwords_or_unk(tok):
    assert "z" not in "".join(captions())
    squircle = tok("a squircle", style="bert")["input_ids"][0].tolist()
    assert tok.unk_id not in squircle and len(squircle) > 4  # known letters: split into subwords
    assert tok.decode(squircle) == "a squircle"
    zebra = tok("a zebra", style="bert")["input_ids"][0].tolist()
    assert zebra == [tok.cls_id, tok("a", style="bert")["input_ids"][0, 1].item(), tok.unk_id, tok.sep_id]


def test_batch_decode(tok):
    texts = ["a red circle", "a large blue square below a small green triangle"]
    assert tok.batch_decode(tok(texts)["input_ids"]) == texts
    assert tok.batch_decode(tok(texts)["input_ids"].tolist()) == texts


@pytest.mark.parametrize("target", ["tokenizer.json", "run_dir"])
def test_save_load_round_trip(tok, tmp_path, target):
    written = tok.save(tmp_path / target)
    assert written.name == "tokenizer.json" and written.is_file()
    loaded = Tokenizer.load(tmp_path / target)
    texts = ["a small red circle left of a large blue square", "a squircle"]
    for style in ("clip", "bert"):
        assert torch.equal(loaded(texts, style=style)["input_ids"], tok(texts, style=style)["input_ids"])
    assert loaded.vocab_size == tok.vocab_size


def test_pickle_round_trip(tok):
    texts = ["a red circle", "a large purple triangle"]
    expected = tok(texts, max_length=8)  # builds a configured copy that the pickle must not need
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(texts, max_length=8)["input_ids"], expected["input_ids"])
    assert clone.decode(expected["input_ids"][1]) == "a large purple triangle"


def test_load_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        Tokenizer.load(tmp_path / "nowhere.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.tokenizer\.json"):
        Tokenizer.load(tmp_path / "empty")


def test_load_invalid_file_names_it(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        Tokenizer.load(bad)


def wordpiece_file(path, specials: list[str]):
    """A plain `tokenizers` tokenizer.json (like a checkpoint's) with only the given specials."""
    vocab = {t: i for i, t in enumerate(specials + ["a", "red", "circle"])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=specials[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return path


def test_load_bert_style_file_without_vlp_extras(tmp_path):
    tok = Tokenizer.load(wordpiece_file(tmp_path / "bert.json", [UNK, PAD, CLS, SEP]))
    assert (tok.unk_id, tok.pad_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
    assert tok.enc_id is None and tok.sot_id is None and tok.mask_id is None
    batch = tok(["a red circle", "a"], style="bert")
    assert batch["input_ids"].tolist() == [[2, 4, 5, 6, 3], [2, 4, 3, 1, 1]]
    with pytest.raises(ValueError, match=r"<\|startoftext\|> and <\|endoftext\|>.*bert\.json"):
        tok("a red circle", style="clip")


def test_load_clip_style_file_without_pad_pads_with_eot(tmp_path):
    tok = Tokenizer.load(wordpiece_file(tmp_path / "clip.json", [EOT, SOT]))
    assert tok.pad_id is None and tok.eot_id == 0 and tok.sot_id == 1
    batch = tok(["a red circle", "a"], style="clip")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0], [1, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_load_file_without_any_style_names_it(tmp_path):
    path = wordpiece_file(tmp_path / "odd.json", [UNK, PAD, CLS])
    with pytest.raises(DataError, match=r"odd\.json.*neither"):
        Tokenizer.load(path)
    assert json.loads(path.read_text())["model"]["type"] == "WordPiece"  # the file itself is valid


def test_bad_arguments_are_named(tok):
    with pytest.raises(ValueError, match="unknown tokenizer style 'gpt'"):
        tok("a circle", style="gpt")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tok("a circle", max_length=1)
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(TypeError, match="text 1 is int, not str"):
        tok(["a circle", 3])
    with pytest.raises(TypeError, match="text 2 is NoneType, not str"):
        Tokenizer.train(["a circle", "a square", None])
