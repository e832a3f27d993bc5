"""The transformer block every tower is made of, and a stack of them.

Paper differences are configuration: pre-LN (CLIP, ViT) or post-LN (BERT), the activation
(`quick_gelu` for OpenAI CLIP, `gelu` elsewhere), LayerNorm eps, and optional cross-attention
to a context (image patches) in every k-th block for fusion encoders and decoders.

Activation checkpointing (`set_grad_checkpointing`, `train.grad_checkpointing`) keeps only each
block's input during the forward pass and recomputes the block in the backward pass: the same
gradients for less activation memory, at the price of a second forward (torch.utils.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.nn.attention import Attention, KVCache


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
}


@dataclass
class TransformerConfig:
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    mlp_dim: int = 0  # hidden width of the MLP; 0: width x mlp_ratio (checkpoints give it exactly)
    act: str = "gelu"
    eps: float = 1e-5
    pre_norm: bool = True
    cross_attention_every: int = 0  # 0: none; k: blocks from, from + k, ... attend to the context
    cross_attention_from: int = 0  # first block with cross-attention (ALBEF: the top half fuses)
    context_dim: int | None = None  # width of the context for cross-attention (default: width)
    # Two streams in one sequence, split at a position given at run time: the leading segment
    # (Q-Former queries, VLMo image tokens) gets its own feed-forward weights (`mlp_first`), and
    # with `cross_attention_first_only` only it cross-attends to the context (Q-Former).
    split_ffn: bool = False
    cross_attention_first_only: bool = False
    fusion_ffn_layers: int = 0  # the top F blocks also get a third FFN for fused sequences (VLMo's VL-FFN)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each with a residual and a LayerNorm."""

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = False, fusion_ffn: bool = False):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.cross_attn = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(cfg.width, eps=cfg.eps)
            self.cross_attn = Attention(cfg.width, cfg.heads, context_dim=cfg.context_dim or cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        hidden = cfg.mlp_dim or int(cfg.width * cfg.mlp_ratio)
        self.mlp = MLP(cfg.width, hidden, cfg.act)
        self.first_only = cfg.cross_attention_first_only
        self.mlp_first = self.norm2_first = None
        if cfg.split_ffn:
            self.norm2_first = nn.LayerNorm(cfg.width, eps=cfg.eps)
            self.mlp_first = MLP(cfg.width, hidden, cfg.act)
        self.mlp_fusion = self.norm2_fusion = None
        if fusion_ffn:
            self.norm2_fusion = nn.LayerNorm(cfg.width, eps=cfg.eps)
            self.mlp_fusion = MLP(cfg.width, hidden, cfg.act)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + fn(norm(x))
        return norm(x + fn(x))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        index: int = 0,
        split: int | None = None,
        fused: bool = False,
        context_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without a `context` the cross-attention is skipped (BLIP's unimodal text mode);
        `context_rows` as in `Attention`.
        `index` is this block's position in its stack, its key in the `cache`; `split` is where
        the leading segment ends (two-stream configs); `fused` sends every token through the
        fusion FFN where the block has one."""
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.entry(index, "self"), cache.entry(index, "cross")
        x = self._residual(x, self.norm1, lambda h: self.attn(h, mask=mask, is_causal=is_causal, cache=self_cache))
        if self.cross_attn is not None and context is not None:

            def cross(h: torch.Tensor) -> torch.Tensor:
                return self._residual(
                    h,
                    self.norm_cross,
                    lambda g: self.cross_attn(
                        g, context=context, mask=context_mask, cache=cross_cache, context_rows=context_rows
                    ),
                )

            x = self._on_segments(x, split, cross, lambda h: h) if self.first_only else cross(x)
        if fused and self.mlp_fusion is not None:
            return self._residual(x, self.norm2_fusion, self.mlp_fusion)
        if self.mlp_first is None:
            return self._residual(x, self.norm2, self.mlp)
        return self._on_segments(
            x,
            split,
            lambda h: self._residual(h, self.norm2_first, self.mlp_first),
            lambda h: self._residual(h, self.norm2, self.mlp),
        )

    @staticmethod
    def _on_segments(x: torch.Tensor, split: int | None, first, rest) -> torch.Tensor:
        """`first` on the tokens before `split`, `rest` on the others (None: all are first)."""
        split = x.shape[1] if split is None else split
        parts = [fn(part) for fn, part in ((first, x[:, :split]), (rest, x[:, split:])) if part.shape[1]]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class Transformer(nn.Module):
    """A stack of `Block`s; cross-attention where `cross_attention_every` says."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        every = cfg.cross_attention_every
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                cross_attention=bool(every)
                and i >= cfg.cross_attention_from
                and (i - cfg.cross_attention_from) % every == 0,
                fusion_ffn=i >= cfg.layers - cfg.fusion_ffn_layers,
            )
            for i in range(cfg.layers)
        )
        self.apply(init_weights)
        self._scale_init(cfg)
        self.grad_checkpointing = False  # see set_grad_checkpointing

    @torch.no_grad()
    def _scale_init(self, cfg: TransformerConfig) -> None:
        """Width-scaled init (as in CLIP's released code): attention inputs width^-1/2, MLP inputs
        (2 width)^-1/2, residual outputs also shrunk by (2 layers)^-1/2. The fixed 0.02 of
        BERT/ViT is far too small for narrow towers: every image then maps to the same embedding
        at init and contrastive training stalls."""
        attn_std = cfg.width**-0.5
        out_std = attn_std * (2 * max(cfg.layers, 1)) ** -0.5
        for block in self.blocks:
            for attn in filter(None, (block.attn, block.cross_attn)):
                for proj in (attn.q, attn.kv) if attn.is_cross else (attn.qkv,):
                    nn.init.normal_(proj.weight, std=attn_std)
                nn.init.normal_(attn.out.weight, std=out_std)
            for mlp in filter(None, (block.mlp, block.mlp_first, block.mlp_fusion)):
                nn.init.normal_(mlp.fc1.weight, std=(2 * cfg.width) ** -0.5)
                nn.init.normal_(mlp.fc2.weight, std=out_std)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layers: slice = slice(None),
        split: int | None = None,
        fused: bool = False,
        context_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the blocks in `layers` (ALBEF runs its text half and fusion half separately)."""
        start = layers.indices(len(self.blocks))[0]
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks[layers], start=start):
            x = (partial(checkpoint, block, use_reentrant=False) if recompute else block)(
                x,
                mask=mask,
                is_causal=is_causal,
                context=context,
                context_mask=context_mask,
                cache=cache,
                index=i,
                split=split,
                fused=fused,
                context_rows=context_rows,
            )
        return x


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on (off) in every `Transformer` of `model`, block by
    block; returns how many stacks it reached. Generation (with a KV cache) and no-grad passes
    (momentum encoders, evaluation) run plainly."""
    stacks = [module for module in model.modules() if isinstance(module, Transformer)]
    for stack in stacks:
        stack.grad_checkpointing = enabled
    return len(stacks)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear/embedding weights, zero biases, unit LayerNorms (ViT/BERT style)."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
