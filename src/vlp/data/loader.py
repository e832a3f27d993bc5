"""From a `CaptionDataset` to training batches that resume exactly.

The sample stream is a pure function of (seed, position): epoch e visits the data in the
permutation drawn from (seed, e), and each sample's augmentation and caption choice come from
a `random.Random` seeded by (seed, epoch, index). A resumed run that starts at the saved
position therefore sees the same batches as a run that never stopped, whatever the number of
DataLoader workers, and under DDP each rank takes its own slice of every global batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Sample, Skipped
from vlp.data.tokenizer import Tokenizer
from vlp.prompts import QA_PROMPT


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG that decides one sample's augmentation and caption in one epoch."""
    return random.Random(f"{seed}:{epoch}:{index}")


TEXT_MODES = ("caption", "qa", "caption+qa")


class TrainSet(Dataset):
    """Item (epoch, index) -> {"image": augmented tensor, "caption": one of its captions}, or
    with `text="qa"` {"image", "question", "answer"}: one of the sample's `meta["qa"]` pairs, or
    with `text="caption+qa"` (a text-only LM's pretraining: it reads questions and answers as
    text, as a large LM has) a "caption" that is, with even odds, a caption or one of the pairs
    written as `QA_PROMPT` followed by the answer. Without a `transform` (text-only recipes) the
    image is never decoded and not in the item. An unreadable sample is {"epoch", "skipped":
    Skipped}, for the collator to pass on."""

    def __init__(
        self,
        base: CaptionDataset,
        transform: Callable[[Image.Image, random.Random], torch.Tensor] | None,
        seed: int,
        text: str = "caption",
    ):
        if text not in TEXT_MODES:
            raise ValueError(f"data.text must be one of {', '.join(TEXT_MODES)}, got {text!r}")
        self.base, self.transform, self.seed, self.text = base, transform, seed, text

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = self.base[index]
        if self.text != "caption" and isinstance(item, Sample) and not item.meta.get("qa"):
            item = Skipped(item.source, f"no question-answer pairs (meta.qa) for data.text={self.text}")
        if isinstance(item, Skipped):
            return {"epoch": epoch, "skipped": item}
        rng = sample_rng(self.seed, epoch, index)
        sample: dict[str, Any] = {}
        if self.transform is not None:  # the crop draws from `rng` first
            sample["image"] = self.transform(item.image, rng)
        if self.text == "caption" or (self.text == "caption+qa" and rng.random() < 0.5):
            return {**sample, "caption": rng.choice(item.captions)}
        qa = rng.choice(item.meta["qa"])
        if self.text == "caption+qa":
            return {**sample, "caption": f"{QA_PROMPT.format(qa['question'])} {qa['answer']}"}
        return {**sample, "question": qa["question"], "answer": qa["answer"]}


class StreamSampler(Sampler[list[tuple[int, int]]]):
    """Endless global batches of (epoch, index) keys, starting `start` samples into the stream."""

    def __init__(self, size: int, global_batch: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.size, self.global_batch, self.seed, self.start = size, global_batch, seed, start
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._perms[epoch]

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        return epoch, self._perm(epoch)[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world_size
        position = self.start
        while True:
            first = position + self.rank * local
            yield [self.key(p) for p in range(first, first + local)]
            position += self.global_batch


class Collator:
    """Stack images, tokenize captions, and pass unreadable samples on for counting."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, style: str, prompt: str = ""):
        self.tokenizer, self.context_length, self.style = tokenizer, context_length, style
        self.prompt = prompt
        # Tokens before the first caption token: the start token and the prompt's own.
        self.prompt_length = tokenizer(prompt, style=style)["input_ids"].shape[1] - 1 if prompt else 1

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of the readable items, with "size" (how many) and "skipped": (epoch,
        Skipped) pairs; a batch with no readable item holds only those two."""
        good = [item for item in items if "skipped" not in item]
        batch = {
            "size": len(good),
            "skipped": [(item["epoch"], item["skipped"]) for item in items if "skipped" in item],
        }
        if not good:
            return batch
        if "image" in good[0]:
            batch["images"] = torch.stack([item["image"] for item in good])
        if "question" in good[0]:  # question -> input_ids/attention_mask, answer -> answer_*
            answers = self._tokenize([item["answer"] for item in good])
            batch.update(answer_ids=answers["input_ids"], answer_mask=answers["attention_mask"])
            texts = [item["question"] for item in good]
        else:
            texts = [self.prompt + item["caption"] for item in good]
            batch.update(prompt_length=self.prompt_length, texts=[item["caption"] for item in good])
        return {**batch, **self._tokenize(texts)}

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, max_length=self.context_length, style=self.style)


def train_loader(
    dataset: TrainSet,
    collator: Collator,
    global_batch: int,
    seed: int,
    start: int,
    rank: int,
    world_size: int,
    workers: int,
) -> DataLoader:
    """An endless DataLoader over the stream, starting `start` samples in."""
    sampler = StreamSampler(len(dataset), global_batch, seed, start, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, **loader_options(collator, seed, workers))


def loader_options(collator: Collator, seed: int, workers: int) -> dict[str, Any]:
    """The DataLoader options of the training loaders (this one and `vlp.data.streaming`'s). Its
    own generator: creating the loader must not draw from the global RNG, which the model's own
    randomness (masking, hard negatives) uses and checkpoints restore."""
    return {
        "collate_fn": collator,
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers else None,
        "generator": torch.Generator().manual_seed(seed),
    }
