"""Image transforms: PIL image in, normalised float32 tensor [3, size, size] out.

Training augmentation is a random resized crop whose parameters come from a `random.Random`
passed in by the caller, so the crop is a pure function of a per-sample seed: training resumes
exactly and does not depend on DataLoader workers or the global torch RNG. There is no
horizontal flip anywhere: it would make "left of" / "right of" captions false.

The transforms are small classes rather than closures so DataLoader workers can pickle them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

# OpenAI CLIP's per-channel RGB normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_crop(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.85, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop box (top, left, height, width) inside a width x height image.

    The box covers a fraction of the image area drawn uniformly from `scale`, with an aspect
    ratio (width / height) drawn log-uniformly from `ratio`. If no such box fits after
    `attempts` draws, returns the largest centred box whose aspect ratio is within `ratio`.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w = min(width, round(height * aspect))
    h = min(height, round(width / aspect))
    return (height - h) // 2, (width - w) // 2, h, w


def _to_normalized_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    tensor = F.to_dtype(F.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    return F.normalize(tensor, list(mean), list(std))


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop (parameters from the given rng), bicubic resize, normalise."""

    size: int
    scale: tuple[float, float] = (0.85, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        top, left, h, w = sample_crop(image.width, image.height, rng, self.scale, self.ratio)
        size = [self.size, self.size]
        image = F.resized_crop(image, top, left, h, w, size, InterpolationMode.BICUBIC)
        return _to_normalized_tensor(image, self.mean, self.std)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to `size` (bicubic), centre crop, normalise."""

    size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = F.resize(image, [self.size], InterpolationMode.BICUBIC, antialias=True)
        image = F.center_crop(image, [self.size, self.size])
        return _to_normalized_tensor(image, self.mean, self.std)


def train_transform(
    size: int,
    scale: tuple[float, float] = (0.85, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> TrainTransform:
    """`transform(image, rng) -> float32 [3, size, size]`; the crop depends only on `rng`."""
    return TrainTransform(size, tuple(scale), tuple(ratio), tuple(mean), tuple(std))


def eval_transform(size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> EvalTransform:
    """`transform(image) -> float32 [3, size, size]`: shorter side to `size`, centre crop."""
    return EvalTransform(size, tuple(mean), tuple(std))


def model_images(model: torch.nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL `images` as a batch for `model`: its eval transform, stacked on its device."""
    transform = eval_transform(model.image_size())
    device = next(model.parameters()).device
    return torch.stack([transform(image.convert("RGB")) for image in images]).to(device)
