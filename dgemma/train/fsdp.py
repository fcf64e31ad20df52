"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for the trainer, and its sharded
checkpoints (`torch.distributed.checkpoint`).

- `shard` makes every decoder layer one FSDP unit (its parameters all-gathered just before its forward and freed
  after it, gradients reduce-scattered after its backward) and the root the last one (embedding = tied LM head,
  final norm, self-conditioning MLP). The LM head and the soft embedding are methods, not the root's forward:
  they are registered as FSDP forward methods, so each call gathers the embedding it needs. Gradients are *summed*
  over ranks, not averaged: the trainer's losses are already divided by the global counts (trainer.py). Parameters
  a rank's batch did not reach (the self-conditioning MLP when none of its rows is self-conditioned) still join the
  reduce-scatter, with zeros. The vision tower, if any, is frozen and left out (replicated; text training never
  reaches it).
- Mixed precision (`param_dtype`): FSDP casts the gathered parameters to bf16 for the forward and backward and
  reduces gradients in fp32 into fp32 master shards; the optimiser steps in fp32.
- Activation checkpointing (`activation_checkpointing`, also without FSDP): each layer's forward runs under
  `torch.utils.checkpoint` (non-reentrant) and is recomputed in the backward. The module tree is unchanged, so
  parameter names stay those of the HF layout.
- Sharded checkpoints: each rank writes its own shards of the model and of the AdamW state as safetensors files
  (DCP's HuggingFace storage writer: the shard offsets sit in each file's header, no pickled metadata), under the
  parameters' names. They load into any number of ranks, FSDP or not. LoRA runs save only the adapter (the base
  comes from `init_from`, as for the other trainer). `gather_full` collects the full state dict on rank 0 for the
  HF-layout export.

Every rank must run the same sequence of forwards (each one all-gathers): the objective and the evaluation run in
lockstep under FSDP (objective.loss_parts / evaluation.evaluate, `lockstep=True`).

torch.distributed's FSDP and checkpoint packages are imported where used: they take seconds to import, and the
unsharded trainer never needs them.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import DiffusionGemma
from .lora import LoRAConfig, apply_lora

SHARDED = "sharded"  # the checkpoint's sub-folder of per-rank safetensors shards
# The root returns its hidden states as views of one packed tensor; FSDP warns that an in-place op on such a view
# would skip its backward hook. The objective never writes into them.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDiffusionGemma\) returned a view tensor")
MODEL, OPTIMIZER = "model.", "optimizer."  # key prefixes in the shards


# MARK: activation checkpointing
def _checkpointed_forward(forward, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False)


def checkpoint_layers(model: DiffusionGemma) -> None:
    """Recompute each layer's activations in the backward instead of keeping them (idempotent)."""
    for layer in model.layers:
        if "forward" not in layer.__dict__:
            layer.forward = functools.partial(_checkpointed_forward, type(layer).forward.__get__(layer))


# MARK: sharding
def broadcast_from_rank0(module: nn.Module, device: torch.device, skip: tuple[nn.Module, ...] = ()) -> None:
    """Give every rank rank 0's values of `module`'s parameters and buffers, one tensor at a time through `device`
    (nccl broadcasts device memory); a rank that built the module on the meta device gets real CPU tensors first.
    Submodules in `skip` (already sharded) are left alone."""
    skipped = {id(t) for m in skip for t in [*m.parameters(), *m.buffers()]}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or id(t) in skipped:
                    continue
                if t.is_meta:
                    real = torch.empty_like(t, device="cpu")
                    t = table[name] = nn.Parameter(real, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else real
                buf = t.data.to(device)
                dist.broadcast(buf, 0)
                if buf is not t.data:
                    t.data.copy_(buf)


def shard(model: DiffusionGemma, param_dtype: torch.dtype | None = None,
          device: torch.device = torch.device("cpu"), reshard_after_forward: bool = True) -> None:
    """Apply FSDP2 in place over all ranks of the default process group: one unit per layer, then the root (see the
    module docstring). Each unit takes rank 0's values and moves to the device (the current CUDA device, or the
    CPU) as it is sharded, so the full model never sits on one device, and ranks other than 0 may bring a model
    built on the meta device: host memory then holds one full copy per node, rank 0's, not one per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set()
    if getattr(model, "vision", None) is not None:
        for p in model.vision.parameters():
            p.requires_grad_(False)
            ignored.add(p)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.layers:
        broadcast_from_rank0(layer, device)
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    broadcast_from_rank0(model, device, skip=tuple(model.layers))
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    for method in ("logits", "soft_embed"):
        register_fsdp_forward_method(model, method)
    # FSDP hooks a unit's gradient reduction onto its inputs' gradients. With a frozen embedding (LoRA) the first
    # layer's input would need a gradient only on a rank whose batch ran the self-conditioning MLP (trainable
    # adapters): the ranks would then reduce in different orders. Embeddings that always need a gradient keep them
    # in step.
    model.embed_tokens.register_forward_hook(_needs_grad)
    for module in [model, *model.layers]:
        module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already divided by the global counts
    model.set_reduce_scatter_unused_params(True)


def _needs_grad(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and not out.requires_grad:
        out.requires_grad_(True)
    return out


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (over every rank's shards), and the gradients scaled to `max_norm` if above it."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm of every rank's shards
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


# MARK: sharded checkpoints
def _options(lora: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=lora)  # LoRA: the adapter only (and the buffers)


def _flat(model: nn.Module, optimizer: torch.optim.Optimizer, lora: bool) -> dict[str, torch.Tensor]:
    """Model and optimiser state as one flat dict of (sharded) tensors, keyed by parameter name; the optimiser's
    hyper-parameters are not tensors and travel in trainer_state.json."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=_options(lora))
    flat = {MODEL + k: v for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        for k, v in state.items():
            flat[f"{OPTIMIZER}{fqn}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, lora: bool) -> None:
    """Every rank writes its shards into `path/sharded/` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    dcp.save(_flat(model, optimizer, lora),
             storage_writer=HuggingFaceStorageWriter(str(path / SHARDED), save_distributed=True))


def check_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, lora: bool) -> None:
    """Read every shard's header and check that they hold, together, each tensor this run needs at its full
    shape; raises (without touching the run's state) on a missing, truncated or foreign checkpoint."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    folder = path / SHARDED
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no shards")
    for f in files:  # a truncated file: its header promises more bytes than it has
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if f.stat().st_size < 8 + n + end:
            raise ValueError(f"{f.name} is truncated ({f.stat().st_size} of {8 + n + end} bytes)")
    meta = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    for key, t in _flat(model, optimizer, lora).items():
        shape = tuple(t.shape)
        if key not in meta:
            raise ValueError(f"{folder}: tensor {key} is missing")
        if tuple(meta[key].size) != shape:
            raise ValueError(f"{folder}: tensor {key} has shape {tuple(meta[key].size)}, the run needs {shape}")
        covered = sum(int(torch.Size(c.sizes).numel()) for c in meta[key].chunks)
        if covered != int(torch.Size(shape).numel()):
            raise ValueError(f"{folder}: tensor {key}: the shards cover {covered} of {torch.Size(shape).numel()} "
                             "elements")


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, lora: bool) -> None:
    """Load `path/sharded/` into the model and optimiser in place, each rank reading its own slices (collective
    under FSDP; works on a single unsharded process too). The optimiser's hyper-parameters are the caller's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    flat = _flat(model, optimizer, lora)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDED)), no_dist=not dist.is_initialized())
    msd, osd = get_state_dict(model, optimizer, options=_options(lora))
    msd = {k: flat[MODEL + k] for k in msd}
    for fqn, state in osd["state"].items():
        for k, v in state.items():
            state[k] = flat[f"{OPTIMIZER}{fqn}.{k}"] if torch.is_tensor(v) else type(v)(flat[f"{OPTIMIZER}{fqn}.{k}"])
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options(lora))


# MARK: export
def gather_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; {} on the other ranks (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(model: DiffusionGemma, state: dict[str, torch.Tensor], lora: LoRAConfig | None) -> DiffusionGemma:
    """An unsharded DiffusionGemma (with the same LoRA wrapping) holding `state`, for the existing export path."""
    with torch.device("meta"):
        copy = DiffusionGemma(model.config)
    copy.vision = getattr(model, "vision", None)
    if lora is not None:
        apply_lora(copy, lora)
    for name, t in list(copy.named_parameters()) + list(copy.named_buffers()):
        if name.startswith("vision.") or "inv_freq" in name:
            continue
        if name not in state:
            raise ValueError(f"the gathered state has no {name}")
        mod_name, _, attr = name.rpartition(".")
        mod = copy.get_submodule(mod_name) if mod_name else copy
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(state[name], requires_grad=False)
        else:
            mod._buffers[attr] = state[name]
    copy.reset_rope()
    return copy.eval()
