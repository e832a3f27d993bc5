"""CLIP's modified ResNet image tower (Radford et al. 2021, Sec. 2.4), and the factory that
picks a CLIP image tower from its config (`vision.kind: vit | resnet`).

Three changes to a ResNet-D-like network (He et al. 2019), each for the reason the paper gives:

- the stem is three 3x3 convolutions (the first with stride 2) and an average pool, not one 7x7
  convolution and a max pool;
- strided blocks are anti-aliased (Zhang 2019): the 3x3 convolution keeps stride 1 and an
  average pool of the stride's size follows it, and the shortcut pools before its 1x1
  convolution, so no block samples a feature map without low-passing it first;
- global average pooling is replaced by one layer of multi-head QKV attention whose query is
  the mean of the final feature map ("attention pooling"); its output projection maps to the
  joint embedding, so a ResNet CLIP has no separate image projection.

BatchNorm: `model.eval()` (which `vlp.load` and the evaluation use) switches to the running
statistics. Under DDP each rank normalises over its own part of the batch (DDP broadcasts rank
0's running statistics every step); `torch.nn.SyncBatchNorm.convert_sync_batchnorm` would make
the statistics global, and vlp does not apply it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.nn.vit import VisionConfig, VisionTransformer

EXPANSION = 4  # a bottleneck's output has 4 x its inner width
TOTAL_STRIDE = 32  # stem 4 (conv stride 2, pool 2) x stages 2, 3, 4 (stride 2 each)


def conv_norm(channels_in: int, channels_out: int, kernel: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free convolution ('same' padding, stride 1) and the BatchNorm after it."""
    return nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(channels_out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, [average pool when strided], 1x1 expand x4; the shortcut is the identity,
    or (average pool,) 1x1 convolution and BatchNorm where the shape changes."""

    def __init__(self, channels_in: int, inner: int, stride: int = 1):
        super().__init__()
        out = inner * EXPANSION
        self.conv1, self.norm1 = conv_norm(channels_in, inner, 1)
        self.conv2, self.norm2 = conv_norm(inner, inner, 3)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()  # anti-aliased stride
        self.conv3, self.norm3 = conv_norm(inner, out, 1)
        self.shortcut = None
        if stride > 1 or channels_in != out:
            pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, *conv_norm(channels_in, out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W] -> [B, 4 inner, H / stride, W / stride]."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.pool(F.relu(self.norm2(self.conv2(y))))
        y = self.norm3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class AttentionPool(nn.Module):
    """One multi-head attention layer over the final feature map whose only query is the map's
    mean (CLIP Sec. 2.4). Positions are learned for the mean token and every cell; the mean
    token attends to itself and the cells. `out` projects to `out_dim` (CLIP: the embedding)."""

    def __init__(self, dim: int, heads: int, cells: int, out_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pool width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(cells + 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys and values of the mean token and the cells
        self.out = nn.Linear(dim, out_dim)
        for linear in (self.q, self.kv, self.out):
            nn.init.normal_(linear.weight, std=dim**-0.5)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, C, h, w] -> (pooled [B, out_dim], tokens [B, 1 + h w, C] with positions)."""
        x = features.flatten(2).transpose(1, 2)  # [B, h w, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)  # [B, 1 + h w, C]

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        k, v = self.kv(x).chunk(2, dim=-1)
        pooled = F.scaled_dot_product_attention(split(self.q(x[:, :1])), split(k), split(v))  # [B, heads, 1, d]
        return self.out(pooled.transpose(1, 2).flatten(1)), x


def feature_grid(image_size: int) -> int:
    """Side of the final feature map: the stem's stride-2 convolution rounds up, pools round down."""
    return ((image_size + 1) // 2) // (TOTAL_STRIDE // 2)


class ModifiedResNet(nn.Module):
    """Stem, four stages of bottlenecks (inner widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), attention
    pool over the 32x-downsampled map of 32w channels. `forward` returns (pooled [B, out_dim],
    tokens [B, 1 + cells, 32 w]) like `VisionTransformer`'s (pooled, tokens)."""

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        width = cfg.width
        if width % 2:
            raise ValueError(f"a ResNet tower needs an even width (its stem halves it), got {width}")
        if len(cfg.stages) != 4 or min(cfg.stages) < 1:
            raise ValueError(f"vision.stages must be four block counts of 1 or more, got {list(cfg.stages)}")
        grid = feature_grid(cfg.image_size)
        if grid < 1:
            raise ValueError(f"image_size {cfg.image_size} is below a ResNet tower's stride of {TOTAL_STRIDE}")
        self.cfg = cfg
        self.conv1, self.norm1 = conv_norm(3, width // 2, 3)
        self.conv1.stride = (2, 2)
        self.conv2, self.norm2 = conv_norm(width // 2, width // 2, 3)
        self.conv3, self.norm3 = conv_norm(width // 2, width, 3)
        self.stem_pool = nn.AvgPool2d(2)
        stages, channels = [], width
        for i, blocks in enumerate(cfg.stages):
            inner = width * 2**i
            stage = [Bottleneck(channels, inner, stride=1 if i == 0 else 2)]
            stage += [Bottleneck(inner * EXPANSION, inner) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = inner * EXPANSION
        self.stages = nn.ModuleList(stages)
        self.attn_pool = AttentionPool(channels, cfg.heads, grid * grid, out_dim)
        for stage in self.stages:  # each residual branch starts as zero: blocks begin as identities
            for block in stage:
                nn.init.zeros_(block.norm3.weight)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, width, H / 4, W / 4]."""
        x = F.relu(self.norm1(self.conv1(images)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.stem_pool(F.relu(self.norm3(self.conv3(x))))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return self.attn_pool(x)  # x: [B, 32 width, H / 32, W / 32]


IMAGE_TOWERS = ("vit", "resnet")


def image_tower(cfg: VisionConfig, embed_dim: int) -> nn.Module:
    """The image tower `cfg.kind` names; a ResNet's attention pool projects to `embed_dim`."""
    if cfg.kind == "resnet":
        return ModifiedResNet(cfg, embed_dim)
    if cfg.kind != "vit":
        raise ValueError(f"vision.kind must be one of {list(IMAGE_TOWERS)}, got {cfg.kind!r}")
    return VisionTransformer(cfg)


def image_projection(cfg: VisionConfig, embed_dim: int) -> nn.Module:
    """From the tower's pooled output to `embed_dim`: a bias-free linear map after a ViT (left at
    PyTorch's init for the recipe to set), none after a ResNet, whose attention pool ends in one."""
    return nn.Identity() if cfg.kind == "resnet" else nn.Linear(cfg.width, embed_dim, bias=False)
