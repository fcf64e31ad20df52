"""LoRA for DiffusionGemma: low-rank adapters on the linear layers, and merging them back for export.

A small wrapper of our own rather than peft at training time: the model is a custom nn.Module whose checkpoint
names must stay those of the HF layout, experts are 3-D parameters (not nn.Linear), and merging is one addition per
layer. `apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that *shares* the original weight (so base
tensors keep their names, under `<name>.weight`) and adds `lora_A` [r, in] / `lora_B` [out, r];
`y = x W^T + (x A^T B^T) * alpha / r`, peft's own formula. B starts at zero, so training starts from the base model
exactly. The frozen product is the base class's own forward run on the wrapper's attributes, so whatever holds the
wrapper's weight (FSDP re-registers gathered shards on it) is what is used. `merge_lora` puts clones of the original
linears holding `W + B A * scale` in their place, leaving a model
that `dgemma.checkpoint.save` writes in the HF layout; `unmerge_lora` swaps the adapters back, so an export in the
middle of training changes nothing. On disk, adapters are written in peft's layout (peft_adapter.py), which peft
loads onto the transformers model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Attention and dense-MLP projections of every layer, and the self-conditioning MLP. The router is left alone:
# adapting it shifts expert assignment (NeMo even freezes it for full fine-tuning).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRALinear(nn.Linear):
    """A targeted linear plus its adapter. The base module is kept (out of the module tree, so names do not change)
    and its class's forward computes the frozen product on this module's weight: whatever it does (dgemma's
    batch-invariant mode) still applies."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._base = (base,)  # a tuple hides it from nn.Module's registration
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        self.register_buffer("weight_scale", getattr(base, "weight_scale", None))  # read by batch_invariant.Linear
        self.fp8_activations = getattr(base, "fp8_activations", False)
        dev, dt = base.weight.device, base.weight.dtype
        a = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own init, as peft does
        self.lora_A = nn.Parameter(a.to(dev, dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.scale = scale
        base.weight = None  # this module owns it now (under FSDP a second reference would keep it whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self._base[0]).forward(self, x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def _targets(model: nn.Module, targets: tuple[str, ...]):
    for name, mod in list(model.named_modules()):
        wanted = name.rsplit(".", 1)[-1] in targets and ".router." not in f".{name}."
        if wanted and isinstance(mod, nn.Linear) and not isinstance(mod, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            yield name, (model.get_submodule(parent_name) if parent_name else model), attr, mod


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze every parameter, wrap the targeted linears; returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, parent, attr, mod in _targets(model, cfg.targets):
        setattr(parent, attr, LoRALinear(mod, cfg.rank, cfg.scale, g))
        names.append(name)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {cfg.targets}")
    return names


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _merged_linear(mod: LoRALinear) -> nn.Linear:
    """A shallow clone of the base module (same class, same bias) holding W + B A * scale as its own weight."""
    base = mod._base[0]
    merged = base.__class__.__new__(base.__class__)
    merged.__dict__ = {**base.__dict__, "_parameters": {**base._parameters, "bias": mod.bias}}
    with torch.no_grad():
        w = (mod.weight.float() + mod.delta()).to(mod.weight.dtype)
    merged._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    return merged


def merge_lora(model: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    """Fold every adapter into a copy of its weight, with the original module class in place (the model is then a
    plain DiffusionGemma again). Returns what was swapped, for `unmerge_lora`."""
    swaps = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _merged_linear(mod))
            swaps.append((parent, attr, mod))
    return swaps


def unmerge_lora(swaps: list[tuple[nn.Module, str, LoRALinear]]) -> None:
    """Put the adapters back (their base weights were never modified, so training continues exactly)."""
    for parent, attr, mod in swaps:
        setattr(parent, attr, mod)
