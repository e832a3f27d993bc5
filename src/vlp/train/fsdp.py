"""Fully sharded data parallel training (`train.parallel: fsdp`) with PyTorch's own engine:
FSDP2 (`torch.distributed.fsdp.fully_shard`) and Distributed Checkpoint (DCP).

Sharding. Every transformer block (each `Block` of every `Transformer`, the momentum encoders'
included) is one FSDP unit; blocks that share modules (BLIP's decoder shares all but its
self-attention with the text encoder) form one unit together, as a parameter must belong to
exactly one. The model itself is the root unit and holds the rest (embeddings, projections,
heads, the momentum encoders' own embeddings and projections). Every parameter is then a DTensor
sharded on dim 0 over the ranks, the momentum copies exactly like their online originals, so the
EMA update (`ema_update`) runs on each rank's local shards without communication.

Precision. `train.precision: bf16` gives the policy `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`: weights are gathered in bf16 (half the all-gather traffic and unsharded
memory) and gradients reduced in fp32 into fp32 shards. Autocast stays on as under DDP, so the
ops autocast keeps in fp32 (softmax, losses, norms) still run in fp32.

Checkpoints. A checkpoint of an FSDP run holds `state.json` / `state.safetensors` (step, data
position, scheduler, RNG, optimizer hyper-parameters) as any other, and `sharded/`: a DCP
directory (each rank writes its own shards of the weights and of the optimizer moments, rank 0
the `.metadata` index) instead of `model.safetensors`. DCP reads tensors with
`torch.load(weights_only=True)`, but its `.metadata` is a pickle and non-tensor entries are
pickles too: `SafeReader` unpickles the metadata with an allow-list of DCP's own record classes
(anything else is refused before it is built) and refuses non-tensor entries, so a sharded
checkpoint from elsewhere cannot run code when it is resumed or consolidated.
`consolidated_weights` reads one into a plain state dict in one process, with no process group
(`vlp.load`, `vlp convert`, `vlp train --init` use it).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from vlp.nn.transformer import Transformer

# Recipe methods the trainer calls instead of forward (cached-embedding accumulation): FSDP must
# gather the root's weights around them as around forward.
FORWARD_METHODS = ("embed_pair", "pair_losses")


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 weights for compute, fp32 gradient reduction; fp32: no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def block_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The FSDP units below the root: every transformer block, blocks sharing a parameter joined
    into one unit. A unit sharing a parameter with a module outside every block is left to the
    root (a parameter belongs to exactly one unit)."""
    blocks = [block for module in model.modules() if isinstance(module, Transformer) for block in module.blocks]
    owner: dict[int, int] = {}  # parameter id -> the first block holding it
    parent = list(range(len(blocks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, block in enumerate(blocks):
        for param in block.parameters():
            j = owner.setdefault(id(param), i)
            parent[find(i)] = find(j)
    units: dict[int, list[nn.Module]] = {}
    for i, block in enumerate(blocks):
        units.setdefault(find(i), []).append(block)
    inside = {id(m) for block in blocks for m in block.modules()}
    outside = {id(p) for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False)}
    return [unit for unit in units.values() if not any(id(p) in outside for block in unit for p in block.parameters())]


def ensure_process_group() -> bool:
    """FSDP needs a process group: outside torchrun, make a one-rank gloo group (returns True
    when it made one, which `release_process_group` then ends)."""
    if tdist.is_initialized():
        return False
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    return True


def release_process_group() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def shard(model: nn.Module, device: torch.device, precision: str) -> list[nn.Parameter]:
    """Shard `model` in place (FSDP2): each block unit, then the root. Build the optimizer after
    this (it must see the sharded parameters).

    FSDP2 cannot shard a 0-dim parameter (CLIP's logit scale), and vlp keeps those 0-dim (their
    checkpoints name them so): they are left out of FSDP (`ignored_params`), replicated, and
    returned; their gradients are averaged by `average_replicated` after the backward."""
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    policy = mixed_precision(precision)
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for unit in block_groups(model):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, ignored_params=set(scalars))
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(scalars))
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
    return scalars


def average_replicated(params: list[nn.Parameter]) -> None:
    """Average the gradients of the parameters FSDP left out (see `shard`) over the ranks, as
    FSDP does its own; call after the backward that reduces (the last micro-batch's)."""
    with_grad = [p for p in params if p.grad is not None]
    if with_grad and tdist.get_world_size() > 1:
        grads = torch.stack([p.grad.float() for p in with_grad])
        tdist.all_reduce(grads)
        grads /= tdist.get_world_size()
        for param, grad in zip(with_grad, grads):
            param.grad.copy_(grad)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` over sharded (DTensor) and replicated gradients
    together (torch's own takes one kind at a time); returns the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor().float())
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain).float())
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = min(max_norm / (float(total) + 1e-6), 1.0)
    if coef < 1.0:
        torch._foreach_mul_([g.to_local() for g in sharded] + plain, coef)
    return float(total)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP's no_sync: with False, backward accumulates unsharded gradients without reducing them."""
    model.set_requires_gradient_sync(sync)


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every rank writes its shards of the weights and optimizer moments to `directory` (DCP);
    returns the optimizer's param groups (hyper-parameters and parameter names), which the
    caller stores in state.json."""
    weights = get_model_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim["state"]}, storage_writer=FileSystemWriter(str(directory)))
    return optim["param_groups"]


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Restore a sharded checkpoint written by `save` (any number of ranks: DCP reshards)."""
    weights = get_model_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer)  # initialises AdamW's moments to load into
    target = {"model": weights, "optim": optim["state"]}
    dcp.load(target, storage_reader=SafeReader(str(directory)))
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, optimizer, {"state": target["optim"], "param_groups": param_groups})


def consolidated_weights(directory: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The full weights of a sharded checkpoint (`model.*` entries), read in this one process
    without a process group."""
    metadata = SafeReader(str(directory)).read_metadata()
    prefix = "model."
    state = {
        key[len(prefix) :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    nested = {"model": state}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(nested, storage_reader=SafeReader(str(directory)), no_dist=True)
    return {key: value.to(device) for key, value in nested["model"].items()}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights on every rank, on the CPU (tests, benchmarks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- reading DCP without unpickling anything but its own records --------------------------------------

# DCP's metadata records, by module: nothing else is built from a `.metadata`.
_DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: DCP's own record classes, torch's sizes,
    dtypes and layouts, and paths. Any other global (a function that would run) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_RECORDS.get(module, ()):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}:
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"a DCP checkpoint's metadata refers to {module}.{name}, which vlp does not load")


class SafeReader(FileSystemReader):
    """`FileSystemReader` that unpickles `.metadata` with `_MetadataUnpickler` and refuses
    checkpoints holding non-tensor entries (DCP would read those with a full unpickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent}: not a sharded checkpoint (no .metadata)")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: unreadable sharded-checkpoint metadata: {err}") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata")
        for key, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, BytesStorageMetadata) or not isinstance(meta, TensorStorageMetadata):
                raise ValueError(f"{path}: entry {key!r} is not a tensor; vlp loads tensors only")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata
