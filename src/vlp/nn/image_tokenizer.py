"""A small learned image tokenizer: visual token ids of image patches for masked image modeling.

BEiT used DALL-E's discrete VAE and BEiT v2/BEiT-3 a VQ-KD tokenizer (a codebook trained to
reconstruct CLIP features, so token ids carry semantics). vlp's is deliberately simple: k-means
over normalised pixel patches, trained in seconds by `vlp tokenizer image`. Its ids say what
colour and edge a patch holds, not what object it belongs to, so MIM targets are lower-level
than VQ-KD's: enough to exercise the objective on the shapes world, not a replacement for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, patches, 3 * patch_size ** 2], patches in row-major order."""
    patches = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


class ImageTokenizer(nn.Module):
    """Nearest-centroid ids of patches; the codebook is a buffer (saved with the model)."""

    def __init__(self, codebook_size: int = 256, patch_size: int = 8):
        super().__init__()
        self.patch_size = patch_size
        self.register_buffer("centroids", torch.zeros(codebook_size, 3 * patch_size**2))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Visual token ids [B, patches] of normalised images [B, 3, H, W]."""
        if not self.centroids.any():
            raise RuntimeError(
                "the image tokenizer has no codebook: train one with `vlp tokenizer image` "
                "and set model.image_tokenizer to its file"
            )
        patches = patchify(images, self.patch_size).float()
        return torch.cdist(patches, self.centroids[None].expand(len(patches), -1, -1)).argmin(dim=-1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, iterations: int = 20, seed: int = 0) -> float:
        """k-means (Lloyd) on the patches of `images`; returns the mean squared distance."""
        patches = patchify(images, self.patch_size).flatten(0, 1).float()
        generator = torch.Generator().manual_seed(seed)
        k = len(self.centroids)
        if len(patches) < k:
            raise ValueError(f"{len(patches)} patches cannot make a codebook of {k}: use more images")
        centroids = patches[torch.randperm(len(patches), generator=generator)[:k]].clone()
        for _ in range(iterations):
            assignment = torch.cdist(patches, centroids).argmin(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, assignment, patches)
            counts = torch.bincount(assignment, minlength=k)
            empty = counts == 0  # re-seed empty clusters with random patches
            centroids = torch.where(
                empty[:, None],
                patches[torch.randint(len(patches), (k,), generator=generator)],
                sums / counts.clamp(min=1)[:, None],
            )
        self.centroids.copy_(centroids)
        return float((torch.cdist(patches, centroids).min(dim=1).values ** 2).mean())

    def save(self, path: str | Path) -> None:
        save_file({"centroids": self.centroids.contiguous()}, str(path), metadata={"patch_size": str(self.patch_size)})

    @classmethod
    def load(cls, path: str | Path) -> ImageTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"image tokenizer {path} not found: train one with `vlp tokenizer image DATA --out {path}`"
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            patch_size = int(f.metadata()["patch_size"])
        centroids = load_file(str(path))["centroids"]
        tokenizer = cls(len(centroids), patch_size)
        tokenizer.centroids.copy_(centroids)
        return tokenizer
