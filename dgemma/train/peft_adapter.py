"""LoRA adapters in peft's on-disk layout: `adapter_config.json` + `adapter_model.safetensors`, so that

    PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(BASE), "RUN/final/adapter")

gives the model of dgemma's merged export. dgemma's LoRA wraps each targeted linear once, and both modes use it.
transformers builds the encoder and the decoder as separate modules that share (tie) their weights, so the adapter
of a layer's `q_proj` is written twice, under `model.decoder.layers.i...` and `model.encoder.language_model.
layers.i...`; the self-conditioning MLP exists in the decoder only. `target_modules` is a regex that peft
full-matches against module names: exactly these modules, never the vision tower or the router.
Tensors are named as peft saves them: `base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import LoRAConfig, LoRALinear

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DECODER, ENCODER = "model.decoder.", "model.encoder.language_model."
PREFIX = "base_model.model."


def hf_module_names(name: str) -> list[str]:
    """dgemma module name -> the transformers modules that use its weight (decoder, and encoder for layers)."""
    return [DECODER + name] + ([ENCODER + name] if name.startswith("layers.") else [])


def target_regex(names: list[str]) -> str:
    """A regex full-matching the transformers names of the adapted modules (any layer index)."""
    per_layer = sorted({m.group(1) for n in names if (m := re.fullmatch(r"layers\.\d+\.(.+)", n))})
    other = sorted(n for n in names if not n.startswith("layers."))
    alts = []
    if per_layer:
        alts.append(r"model\.(?:decoder|encoder\.language_model)\.layers\.\d+\.(?:"
                    + "|".join(map(re.escape, per_layer)) + ")")
    if other:
        alts.append(r"model\.decoder\.(?:" + "|".join(map(re.escape, other)) + ")")
    return "|".join(alts)


def adapted(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: nn.Module, cfg: LoRAConfig, path: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapters in peft's layout into the folder `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mods = adapted(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = {}
    for name, mod in mods.items():
        a, b = mod.lora_A.detach().contiguous().cpu(), mod.lora_B.detach().contiguous().cpu()
        for hf in hf_module_names(name):
            # (clones: safetensors refuses tensors that share memory)
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.clone()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.clone()
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": cfg.rank,
        "lora_alpha": cfg.alpha if cfg.alpha is not None else cfg.rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": target_regex(list(mods)), "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    return path


def read_adapter(path: str | Path, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapter folder's tensors under dgemma's parameter names (`layers.0.self_attn.q_proj.lora_A`), checked
    against `cfg`. The encoder copies must equal the decoder's (they are one adapter in dgemma)."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    if config.get("r") != cfg.rank or float(config.get("lora_alpha")) != float(alpha):
        raise ValueError(f"{path}: adapter has r={config.get('r')}, lora_alpha={config.get('lora_alpha')}; "
                         f"this run has rank {cfg.rank}, alpha {alpha}")
    out, copies = {}, {}
    for key, t in load_file(str(path / WEIGHTS)).items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(model\.decoder\.|model\.encoder\.language_model\.)(.+)\."
                         r"(lora_A|lora_B)\.weight", key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key}")
        name = f"{m.group(2)}.{m.group(3)}"
        (out if m.group(1) == DECODER else copies)[name] = t
    for name, t in copies.items():
        if name not in out or not torch.equal(out[name], t):
            raise ValueError(f"{path}: the encoder's adapter {name} differs from the decoder's")
    return out
