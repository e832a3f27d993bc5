"""Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training").

Sec. 3.2 / Algorithm 1: every image-text pair of the batch is an independent binary
classification,

    L = -1/|B| * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),

with z_ij = 1 for the matching pair and -1 otherwise, x and y L2-normalised, t = exp(t') and a
learned bias b (initialised to t' = log 10, b = -10, so that the many negatives start near their
target). No softmax couples the rows, so no rank needs the whole similarity matrix.

Sec. 3.3, the efficient "chunked" implementation: each rank scores its own images against its
own texts (positives and negatives), then passes its text chunk to the next rank around a ring
and scores the chunk it received (negatives only), W - 1 times. A rank holds one b x b block of
logits at a time and never gathers the global batch. The ring exchange carries gradients: in the
backward pass each received chunk's gradient travels back to the rank it came from.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.distributed import gather_sizes, is_distributed, rank, world_size

INIT_LOGIT_SCALE = math.log(10.0)  # t' (Sec. 3.2: t = exp(t') = 10 at initialisation)
INIT_LOGIT_BIAS = -10.0  # b


def _exchange(send: torch.Tensor, to: int, recv: torch.Tensor, source: int) -> torch.Tensor:
    """Send `send` to rank `to` while receiving `recv` from rank `source` (point to point)."""
    ops = [dist.P2POp(dist.isend, send.contiguous(), to), dist.P2POp(dist.irecv, recv, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return recv


class _RingShift(torch.autograd.Function):
    """One step around the ring: this rank's tensor goes to rank + 1 and it gets rank - 1's
    (`rows` rows); the gradient of what it got goes back to rank - 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.sent_rows = x.shape[0]
        here, world = rank(), world_size()
        recv = x.new_empty((rows, *x.shape[1:]))
        return _exchange(x, (here + 1) % world, recv, (here - 1) % world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        here, world = rank(), world_size()
        back = grad.new_empty((ctx.sent_rows, *grad.shape[1:]))
        return _exchange(grad, (here - 1) % world, back, (here + 1) % world), None


def ring_shift(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [n, ...] to the next rank; returns the previous rank's [rows, ...], with gradients."""
    return _RingShift.apply(x, rows)


def sigmoid_block(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: bool,
) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij * logits_ij) of one [I, T] block (Algorithm 1); `positives`:
    the block's diagonal holds the matching pairs (z = 1 there), else every pair is negative.

    Written as sum_ij softplus(logits_ij) - sum_i logits_ii (-log sigmoid(-l) = softplus(l),
    -log sigmoid(l) = softplus(l) - l): no label matrix, and autograd keeps one [I, T] tensor
    (softplus's input) instead of three; the scale multiplies the [I, D] embeddings, not the block.
    """
    logits = (logit_scale * image_emb) @ text_emb.T + logit_bias  # [I, T]
    loss = F.softplus(logits).sum()
    return loss - logits.diagonal().sum() if positives else loss


def sigmoid_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss on L2-normalised [b, D] embeddings, image i matching text i; `logit_scale`
    is t = exp(t') (already exponentiated), `logit_bias` is b.

    Alone: the paper's loss on the batch. Under torch.distributed: this rank's images against
    every rank's texts, the texts passed around the ring (Sec. 3.3), scaled by W / |B| (|B| the
    global batch) so that the mean over ranks, which DDP's gradient averaging optimises, is the
    paper's loss on the global batch, whatever the ranks' batch sizes.
    """
    loss = sigmoid_block(image_emb, text_emb, logit_scale, logit_bias, positives=True)
    if not is_distributed() or world_size() == 1:
        return loss / image_emb.shape[0]
    sizes, here, world = gather_sizes(image_emb.shape[0], image_emb.device), rank(), world_size()
    chunk = text_emb
    for hop in range(1, world):
        chunk = ring_shift(chunk, sizes[(here - hop) % world])  # rank (here - hop)'s texts
        loss = loss + sigmoid_block(image_emb, chunk, logit_scale, logit_bias, positives=False)
    return loss * world / sum(sizes)
