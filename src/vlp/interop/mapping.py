"""Weight-name mappings between vlp modules and other libraries' checkpoints, usable both ways.

A mapping is a list of `Entry`s: one vlp parameter made of one or more source tensors (HF keeps
q, k and v apart where vlp fuses them into `qkv`; open_clip stores projections transposed).
The same list converts a source state dict to vlp (`to_vlp`) and back (`from_vlp`), so a round
trip is exact by construction. Nothing is dropped silently: `to_vlp` reports the source keys it
did not use and the vlp keys it could not fill.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


class CheckpointMismatch(ValueError):
    """Keys a checkpoint lacks or has in excess for the model it is loaded into."""


@dataclass(frozen=True)
class Entry:
    vlp: str
    src: tuple[str, ...]  # concatenated along dim 0 (q, k, v -> qkv)
    transpose: bool = False  # the source stores the matrix transposed (x @ W instead of Linear)


@dataclass
class Report:
    missing: list[str] = field(default_factory=list)  # vlp keys no source tensor filled
    unexpected: list[str] = field(default_factory=list)  # source keys no entry used

    def check(self, source: str, strict: bool) -> None:
        """Raise (strict) or warn about mismatched keys, naming them and the checkpoint."""
        if not (self.missing or self.unexpected):
            return
        message = (
            f"{source}: {len(self.missing)} missing key(s) {self.missing[:8]}, "
            f"{len(self.unexpected)} unexpected key(s) {self.unexpected[:8]}"
        )
        if strict:
            raise CheckpointMismatch(message + " (strict=False loads the rest)")
        import warnings

        warnings.warn(message, stacklevel=3)


def require(settings: dict[str, tuple[Any, Any]], target: str) -> None:
    """Fail, naming them, on the vlp config values (key: (value, the one `target` needs)) that
    the target format cannot express."""
    wrong = {key: got for key, (got, want) in settings.items() if got != want}
    if wrong:
        raise ValueError(f"{target} cannot express this vlp model: {wrong}")


def tower_from_hf(hf: dict[str, Any], act: str, eps: float) -> dict[str, Any]:
    """vlp transformer sizes of a transformers tower config (defaults for absent act/eps)."""
    return {
        "width": hf["hidden_size"],
        "layers": hf["num_hidden_layers"],
        "heads": hf["num_attention_heads"],
        "mlp_dim": hf["intermediate_size"],
        "act": hf.get("hidden_act", act),
        "eps": hf.get("layer_norm_eps", eps),
    }


def tower_to_hf(cfg: Any) -> dict[str, Any]:
    """transformers names of a vlp tower's sizes."""
    return {
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim or int(cfg.width * cfg.mlp_ratio),
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.eps,
    }


def block_entries(
    vlp_prefix: str, src_prefix: str, layers: int, names: dict[str, tuple[str, ...] | str]
) -> list[Entry]:
    """Entries of every transformer block: `names` maps a vlp key inside a block (with `{p}`
    for weight/bias) to the source key(s) inside the source's block."""
    entries = []
    for i in range(layers):
        for vlp_key, src_keys in names.items():
            src_keys = (src_keys,) if isinstance(src_keys, str) else src_keys
            for p in ("weight", "bias"):
                entries.append(
                    Entry(
                        f"{vlp_prefix}.{i}.{vlp_key.format(p=p)}",
                        tuple(f"{src_prefix}.{i}.{k.format(p=p)}" for k in src_keys),
                    )
                )
    return entries


def pairs(
    vlp_prefix: str, src_prefix: str, names: Iterable[tuple[str, str]], params: tuple[str, ...] = ("weight", "bias")
) -> list[Entry]:
    """One-to-one entries for modules with the given params (LayerNorms, Linears)."""
    return [Entry(f"{vlp_prefix}{a}.{p}", (f"{src_prefix}{b}.{p}",)) for a, b in names for p in params]


def to_vlp(
    source: dict[str, torch.Tensor], entries: list[Entry], target: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], Report]:
    """A vlp state dict from `source`, shaped like `target` (the vlp model's own state dict).

    Source keys ending in one of `ignore` (buffers such as position ids) are not reported."""
    state, report, used = {}, Report(), set()
    for entry in entries:
        if not all(k in source for k in entry.src):
            report.missing.append(entry.vlp)
            continue
        parts = [source[k].t() if entry.transpose else source[k] for k in entry.src]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        expected = target[entry.vlp].shape
        if tensor.numel() != expected.numel():
            raise CheckpointMismatch(
                f"{entry.src[0]}: shape {tuple(source[entry.src[0]].shape)} does not fit {entry.vlp} {tuple(expected)}"
            )
        state[entry.vlp] = tensor.reshape(expected).clone()
        used.update(entry.src)
    mapped = {e.vlp for e in entries}
    report.missing += sorted(k for k in target if k not in mapped)
    report.unexpected = sorted(k for k in source if k not in used and not k.endswith(ignore))
    return state, report


def from_vlp(
    state: dict[str, torch.Tensor], entries: list[Entry], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The source-format state dict of a vlp one, shaped like `target` (the source model's)."""
    out = {}
    for entry in entries:
        shapes = [target[k].shape for k in entry.src]
        if entry.transpose:
            shapes = [s[::-1] for s in shapes]
        rows = [s[0] if len(s) else 1 for s in shapes]
        flat = state[entry.vlp].reshape(sum(rows), *shapes[0][1:]) if len(shapes[0]) else state[entry.vlp]
        for key, part, shape in zip(entry.src, flat.split(rows) if len(shapes[0]) else [flat], shapes):
            part = part.reshape(shape)
            out[key] = (part.t() if entry.transpose else part).contiguous()
    return out
