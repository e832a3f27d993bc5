"""Vision Transformer image tower (Dosovitskiy et al. 2021; CLIP's variant adds `ln_pre`; SigLIP's
has no class token and pools with a MAP head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.nn.heads import MAPHead
from vlp.nn.transformer import Transformer, TransformerConfig


@dataclass
class VisionConfig(TransformerConfig):
    image_size: int = 64
    patch_size: int = 8
    pool: str = "cls"  # cls | mean | map: attention pooling by a learned probe (SigLIP, `MAPHead`)
    class_token: bool = True  # False: patch tokens only (SigLIP); needs pool mean or map
    ln_pre: bool = True  # LayerNorm after the embeddings (CLIP)
    patch_bias: bool = False
    stem: str = "patch"  # patch: one linear patch embedding (ViT) | conv: 3x3 stride-2 convs (Xiao et al. 2021)
    # vit: this Vision Transformer | resnet: CLIP's modified ResNet (`vlp.nn.resnet`), which reads
    # image_size, width (of the stem), heads (of its attention pool) and `stages`, and only those.
    # Recipes other than CLIP build a ViT and refuse resnet.
    # FLIP (Li et al. 2023, Sec. 3): in training, drop this share of the patch tokens at random
    # (the class token stays); fewer tokens per image, more images per second. Evaluation sees all.
    patch_dropout: float = 0.0
    kind: str = "vit"
    stages: tuple[int, int, int, int] = (3, 4, 6, 3)  # resnet: bottleneck blocks per stage (RN50)


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(patch) 3x3 stride-2 convolutions with GELU, then a 1x1 conv to `width`.

    "Early Convolutions Help Transformers See Better" (Xiao et al. 2021, Sec. 3): same token
    grid as a patch embedding, but the tokens see shapes across patch borders.
    """
    depth = patch_size.bit_length() - 1
    if 2**depth != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
    layers: list[nn.Module] = []
    channels = 3
    for i in range(depth):
        out = width // 2 ** (depth - i)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


class PatchDropout(nn.Module):
    """Keeps a random (1 - `share`) of each image's patch tokens in training, in their order,
    with the `extra` leading tokens (the class token) always kept; the dropped ones are not
    encoded at all (FLIP, Li et al. 2023, Sec. 3: 50 % or 75 % masking during pretraining)."""

    def __init__(self, share: float, extra: int):
        super().__init__()
        if not 0 <= share < 1:
            raise ValueError(f"vision.patch_dropout must be in [0, 1), got {share}")
        self.share, self.extra = share, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.share == 0:
            return x
        lead, patches = x[:, : self.extra], x[:, self.extra :]
        keep = max(1, round(patches.shape[1] * (1 - self.share)))
        kept = torch.rand(patches.shape[:2], device=x.device).topk(keep, dim=1).indices.sort(dim=1).values
        patches = patches.gather(1, kept[..., None].expand(-1, -1, patches.shape[2]))
        return torch.cat([lead, patches], dim=1)


class VisionTransformer(nn.Module):
    """Patch embedding + class token + learned positions -> transformer -> pooled and tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.kind != "vit":
            raise ValueError(
                f"vision.kind {cfg.kind!r}: this tower is a ViT; only CLIP builds other image towers "
                "(vlp.nn.resnet.image_tower)"
            )
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.pool not in ("cls", "mean", "map"):
            raise ValueError(f"vision pool must be 'cls', 'mean' or 'map', got {cfg.pool!r}")
        if cfg.pool == "cls" and not cfg.class_token:
            raise ValueError("vision pool 'cls' needs class_token: true")
        if cfg.stem not in ("patch", "conv"):
            raise ValueError(f"vision stem must be 'patch' or 'conv', got {cfg.stem!r}")
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        if cfg.stem == "conv":
            self.patch_embed = conv_stem(cfg.width, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.extra = int(cfg.class_token)  # tokens before the patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.extra, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.ln_pre else nn.Identity()
        self.patch_dropout = PatchDropout(cfg.patch_dropout, self.extra)
        self.transformer = Transformer(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.head = None
        if cfg.pool == "map":
            self.head = MAPHead(cfg.width, cfg.heads, cfg.mlp_dim or int(cfg.width * cfg.mlp_ratio), cfg.act, cfg.eps)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=cfg.width**-0.5)
        nn.init.normal_(self.pos_embed, std=cfg.width**-0.5)

    def embed(
        self, images: torch.Tensor, hidden: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch embeddings, class token and positions (and `ln_pre`): [B, 1 + patches, width]
        (without a class token: [B, patches, width]).
        Patches where `hidden` [B, patches] is True are replaced by `mask_token` (BEiT's MIM)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if hidden is not None:
            x = torch.where(hidden[..., None], mask_token.to(x.dtype), x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm_pre(x + self.pos_embed)

    def forward(self, images: torch.Tensor, layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (pooled [B, width], tokens [B, 1 + patches, width]; in
        training with `patch_dropout`, only the kept patches).

        `layers` runs only the first blocks, without the final norm (BLIP-2 reads the
        penultimate block of its frozen encoder: `layers=-1`)."""
        x = self.transformer(self.patch_dropout(self.embed(images)), layers=slice(layers))
        if layers is None:
            x = self.norm(x)
        if self.cfg.pool == "map":
            return self.head(x), x
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, self.extra :].mean(dim=1)
        return pooled, x
