import math

import torch
import torch.nn.functional as F

from vlp.losses.itc import itc_loss


def reference_itc(image, text, scale):
    """The loss written out as in the CLIP paper's pseudo-code, one row at a time."""
    n = image.shape[0]
    logits = scale * image @ text.T
    total = 0.0
    for i in range(n):
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[i]).sum())
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[:, i]).sum())
    return total / (2 * n)


def test_itc_matches_reference():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    torch.testing.assert_close(itc_loss(image, text, scale), reference_itc(image, text, scale))


def test_itc_known_values():
    eye = torch.eye(4, dtype=torch.float64)
    # Perfectly aligned orthogonal embeddings: loss = log(1 + (n-1) e^{-s}).
    s = torch.tensor(10.0, dtype=torch.float64)
    expected = math.log(1 + 3 * math.exp(-10.0))
    assert abs(itc_loss(eye, eye, s).item() - expected) < 1e-12
    # Scale 0: uniform logits, loss = log n.
    assert abs(itc_loss(eye, eye, torch.tensor(0.0, dtype=torch.float64)).item() - math.log(4)) < 1e-12


def test_itc_gradient_float64():
    torch.manual_seed(1)
    image = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    text = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda i, t, s: itc_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s), (image, text, scale)
    )
    # Analytic gradient w.r.t. the image embeddings: (softmax_row - onehot) s t / (2n) plus the column term.
    i, t = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    i.requires_grad_(True)
    itc_loss(i, t, scale.detach()).backward()
    logits = 3.0 * i.detach() @ t.T
    eye = torch.eye(5, dtype=torch.float64)
    grad = ((logits.softmax(1) - eye) @ t * 3.0 + (logits.softmax(0) - eye) @ t * 3.0) / 10
    torch.testing.assert_close(i.grad, grad)
