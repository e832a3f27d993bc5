"""Text tokenizer: a thin wrapper around the Hugging Face `tokenizers` library.

The library does all the work (WordPiece model, normalizer, pre-tokenizer, trainer, special-token
templates, truncation, padding, JSON save/load); this module fixes vlp's conventions on top:

- One vocabulary serves every recipe. It holds BERT/BLIP-style special tokens ([PAD] [UNK] [CLS]
  [SEP] [MASK] [ENC] [DEC]) and CLIP-style ones (<|startoftext|> <|endoftext|>); [PAD] has id 0.
- A batch is framed in one of two styles: "clip" gives `<|startoftext|> tokens <|endoftext|>`,
  "bert" gives `[CLS] tokens [SEP]`. Truncation keeps the end token as the last real token.
- Training is deterministic: one corpus gives one vocabulary (the library's trainer alone does
  not guarantee it).

    tok = Tokenizer.train(captions, vocab_size=4096)
    batch = tok(["a red circle", "a blue square above a green triangle"], max_length=32)
    batch["input_ids"]       # LongTensor [2, L], padded with [PAD] to the longest caption
    batch["attention_mask"]  # LongTensor [2, L], 1 on real tokens, 0 on padding
    tok.save("run/tokenizer.json"); tok = Tokenizer.load("run")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlp.data.sample import DataError

PAD = "[PAD]"
UNK = "[UNK]"
CLS = "[CLS]"
SEP = "[SEP]"
MASK = "[MASK]"
ENC = "[ENC]"
DEC = "[DEC]"
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK, ENC, DEC, SOT, EOT]  # trained vocabularies: ids 0..8
STYLES = {"clip": (SOT, EOT), "bert": (CLS, SEP)}  # style -> (start token, end token)
FILE_NAME = "tokenizer.json"


def _special_id(token: str) -> property:
    """A read-only property: the id of `token`, or None when the vocabulary lacks it."""
    return property(lambda self: self._tok.token_to_id(token), doc=f"Id of {token} (None if absent).")


def _strings(texts: Iterable[str]) -> Iterator[str]:
    """Yield the texts, failing clearly on the first one that is not a string."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, not str: {text!r}")
        yield text


def _wordpiece(model: models.WordPiece) -> tokenizers.Tokenizer:
    """A BERT-style tokenizer around `model`: lowercased, accents stripped, split on whitespace
    and punctuation."""
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _continuing_pieces(tok: tokenizers.Tokenizer, texts: list[str]) -> list[str]:
    """The sorted "##c" pieces of the corpus: every character that follows another in a word."""
    words = {
        word
        for text in set(texts)
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
    }
    chars = {c for word in words for c in word[1:]}
    return [f"##{c}" for c in sorted(chars)]


def _tokenizer_file(path: Path) -> Path:
    """The tokenizer.json a path means: the path itself, or the file inside a directory."""
    return path / FILE_NAME if path.is_dir() or path.suffix != ".json" else path


def _write(tok: tokenizers.Tokenizer, path: str | Path) -> Path:
    """Save `tok` as the tokenizer.json `path` means (see `_tokenizer_file`); return the file."""
    file = _tokenizer_file(Path(path))
    file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(file))
    return file


class Tokenizer:
    """WordPiece tokenizer with vlp's special tokens, returning padded torch batches.

    Special-token rule for loaded files: a tokenizer.json written by another tool (e.g. a BERT or
    CLIP checkpoint's) may lack some of vlp's special tokens. Their id attributes (`enc_id`, ...)
    are then None, and only the styles whose start and end tokens exist can be used; the others
    raise a ValueError naming the missing tokens. Loading fails unless at least one style is
    complete. Without [PAD], batches are padded with the style's end token (as CLIP does); the
    attention mask still marks which positions are padding.

    Instances pickle (DataLoader workers get a copy) and can be shared between threads: each
    (style, max_length, pad_to_max) setting gets its own configured copy of the library tokenizer,
    built once and never changed afterwards.
    """

    pad_id = _special_id(PAD)
    unk_id = _special_id(UNK)
    cls_id = _special_id(CLS)
    sep_id = _special_id(SEP)
    mask_id = _special_id(MASK)
    enc_id = _special_id(ENC)
    dec_id = _special_id(DEC)
    sot_id = _special_id(SOT)
    eot_id = _special_id(EOT)

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<in memory>"):
        """Wrap a library tokenizer; `source` names it in error messages (e.g. its file)."""
        self._tok = tok
        self._source = source
        self._configured: dict[tuple[str, int, bool], tokenizers.Tokenizer] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 1) -> Tokenizer:
        """Train a BERT-style WordPiece vocabulary (lowercased, accents stripped) on captions.

        On a small corpus the vocabulary is smaller than `vocab_size`: it stops when every word
        of the corpus is covered.
        """
        if vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}"
            )
        texts = list(_strings(texts))
        tok = _wordpiece(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
        # The trainer numbers the "##c" pieces in hash-map order, and merge ties are broken by
        # those numbers, so two trainings on one corpus give different vocabularies (tokenizers
        # issue #1794). Reserving the pieces up front, in sorted order, makes training
        # deterministic; the model is then rebuilt so that only SPECIAL_TOKENS are special.
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS + _continuing_pieces(tok, texts),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        rebuilt = _wordpiece(models.WordPiece(tok.get_vocab(), unk_token=UNK, continuing_subword_prefix="##"))
        rebuilt.add_special_tokens(SPECIAL_TOKENS)
        return cls(rebuilt)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the tokenizer.json inside a directory."""
        file = _tokenizer_file(Path(path))
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the library raises a bare Exception on malformed JSON
            raise DataError(f"{file}: not a valid tokenizers JSON file ({err})") from err
        return cls.from_library(tok, str(file))

    @classmethod
    def from_library(cls, tok: tokenizers.Tokenizer, source: str) -> Tokenizer:
        """Wrap a library tokenizer (e.g. a checkpoint's) that has at least one style's tokens."""
        if not any(all(tok.token_to_id(t) is not None for t in ends) for ends in STYLES.values()):
            raise DataError(
                f"{source}: has neither {SOT} and {EOT} (clip style) nor {CLS} and {SEP} (bert style) in its vocabulary"
            )
        return cls(tok, source=source)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to a file path ending in .json, or into a directory; return the file."""
        return _write(self._tok, path)

    def save_for_causal_lm(self, path: str | Path) -> Path:
        """Write tokenizer.json for a transformers causal LM trained on clip-style texts: every
        text starts with the start token and gets no end token, as OPT's tokenizer adds its BOS
        only, so a prompt is framed as the LM saw captions begin."""
        return _write(self._framed(f"{SOT} $A", [SOT]), path)

    def _framed(self, template: str, tokens: list[str]) -> tokenizers.Tokenizer:
        """A copy of the library tokenizer that frames every text by `template` (which names `tokens`)."""
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in tokens]
        )
        return tok

    def special_ids(self) -> dict[str, int]:
        """Ids of the special tokens this vocabulary has, by name (pad, cls, sep, mask, ...)."""
        names = ("pad", "unk", "cls", "sep", "mask", "enc", "dec", "sot", "eot")
        ids = {name: getattr(self, f"{name}_id") for name in names}
        return {name: i for name, i in ids.items() if i is not None}

    def id_to_token(self, i: int) -> str | None:
        """The token string of an id (None if out of range)."""
        return self._tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included (the embedding table size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(
        self, texts: str | list[str], max_length: int = 32, style: str = "clip", pad_to_max: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tokenize, frame, truncate and pad a batch of texts.

        Returns {"input_ids", "attention_mask"}, both LongTensor [B, L]. L is the longest framed
        text, capped at `max_length`, or exactly `max_length` when `pad_to_max` is set.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("nothing to tokenize: the list of texts is empty")
        encodings = self._configured_for(style, max_length, pad_to_max).encode_batch(list(_strings(texts)))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of one sequence of ids; special tokens (padding included) are dropped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def batch_decode(self, ids: list[list[int]] | torch.Tensor, skip_special: bool = True) -> list[str]:
        """Texts of a batch of id sequences (a list of lists or a [B, L] tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode_batch(ids, skip_special_tokens=skip_special)

    def _configured_for(self, style: str, max_length: int, pad_to_max: bool) -> tokenizers.Tokenizer:
        """The library tokenizer set up for one style and length (built on first use, then reused)."""
        key = (style, max_length, pad_to_max)
        if key not in self._configured:
            self._configured[key] = self._configure(style, max_length, pad_to_max)
        return self._configured[key]

    def _configure(self, style: str, max_length: int, pad_to_max: bool) -> tokenizers.Tokenizer:
        """A copy of the library tokenizer with the style's template, truncation and padding."""
        if style not in STYLES:
            raise ValueError(f"unknown tokenizer style {style!r}; choose one of {sorted(STYLES)}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end token), got {max_length}")
        start, end = STYLES[style]
        missing = [t for t in (start, end) if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"style {style!r} needs {' and '.join(missing)}, which the vocabulary of {self._source} lacks"
            )
        tok = self._framed(f"{start} $A {end}", [start, end])
        tok.enable_truncation(max_length)  # the template's tokens count towards max_length
        pad = PAD if self.pad_id is not None else end
        tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad, length=max_length if pad_to_max else None)
        return tok

    def __getstate__(self) -> dict:
        """Pickle only the vocabulary; the configured copies are rebuilt on demand."""
        return {**self.__dict__, "_configured": {}}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self._source!r})"
