"""Load and save checkpoints in the Hugging Face DiffusionGemma layout (safetensors only, never pickles).

Layout (spec 1.5): `model.decoder.*` holds every shared text weight, `model.encoder.language_model.layers.{i}.
layer_scalar` the encoder-mode scalars, `model.encoder.vision_tower.*` / `model.encoder.embed_vision.*` the vision
tower. There is no `lm_head.weight` (tied to the embedding). A single `model.safetensors` or shards listed in
`model.safetensors.index.json`.

Loading builds the model on the meta device and reads each tensor straight onto the target device and dtype (or
quantises it to FP8) one at a time (weight_file.py): a tensor kept on the CPU in its file's dtype is the
memory-mapped view; anything else is read a few MB at a time, so no host copy of the model is ever held. Every
expected tensor must be present and no unexpected one left; errors list the offending names. When the checkpoint
holds a vision tower, it loads into `model.vision` (vision.py) under the same rule; vision tensors dgemma does not
model (a vestigial `embed_vision.embedding.*`) are carried over on save, so a load/save round trip keeps the
checkpoint whole. `language_model_only=True` (vLLM's `--language-model-only`) loads the text model alone: the
tower's tensors are never read (only their names are noted, so a save still writes them) and `model.vision` is None.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import fp8
from .config import ConfigError, GenerationConfig, ModelConfig
from .model import DiffusionGemma
from .weight_file import WeightFile

log = logging.getLogger("dgemma")

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_ENCODER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_vision_warned: set[str] = set()


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or holds unexpected tensors."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype}")
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def to_checkpoint_name(name: str) -> str:
    """dgemma parameter name -> checkpoint tensor name."""
    m = re.match(r"^layers\.(\d+)\.encoder_layer_scalar$", name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    if name.startswith("vision."):  # the image tower (vision.py): vision_tower.* and embed_vision.*
        return "model.encoder." + name[len("vision."):]
    return "model.decoder." + name


def from_checkpoint_name(name: str) -> str | None:
    """checkpoint tensor name -> dgemma parameter name (None for names dgemma does not model)."""
    m = _ENCODER_SCALAR.match(name)
    if m:
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    if name.startswith("model.decoder."):
        return name[len("model.decoder."):]
    if name.startswith(_VISION):
        return "vision." + name[len("model.encoder."):]
    return None


@dataclass
class Checkpoint:
    """What `load` returns: the model, its configs, and where it came from."""

    model: DiffusionGemma
    config: ModelConfig
    generation: GenerationConfig
    path: Path
    passthrough: dict[str, Path] = field(default_factory=dict)  # tensor name -> file (unmodelled, kept on save)
    language_model_only: bool = False  # the vision tower was skipped on load (its tensors are in passthrough)


def weight_files(path: Path) -> list[Path]:
    index, single = path / INDEX, path / WEIGHTS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed but missing: {missing}")
        return files
    if single.is_file():
        return [single]
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickles:
        raise CheckpointError(f"{path}: only pickle weights found ({pickles}); dgemma loads safetensors only "
                              "(convert with transformers: save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX} found")


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         quantization: str | None = None, language_model_only: bool = False, tp=None) -> Checkpoint:
    """Load a DiffusionGemma checkpoint folder. dtype None keeps the checkpoint's floating dtype (of the tensors that
    are not FP8). A compressed-tensors FP8 checkpoint loads in FP8; `quantization="fp8"` quantises a float one
    tensor by tensor as it loads (fp8.py). `language_model_only`: skip the vision tower (none of its tensors is
    read; `model.vision` stays None). `tp` (parallel.TensorParallel): load this rank's shard only, each split
    tensor read as its slices (safetensors `get_slice`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if quantization not in (None, "none", "fp8"):
        raise ValueError(f"quantization must be fp8 or none; got {quantization!r}")
    config = ModelConfig.from_file(path / "config.json")
    try:
        scheme = fp8.Fp8Scheme.from_config(config.raw)  # the checkpoint is FP8 already
    except fp8.Fp8FormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    quantize = scheme is None and quantization == "fp8"
    if quantize:
        scheme = fp8.Fp8Scheme()
        config = replace(config, raw={**config.raw, "quantization_config": scheme.to_config()})
    generation = GenerationConfig.from_file(path / "generation_config.json")
    files = weight_files(path)
    want = parse_dtype(dtype)
    target = _target(device)

    with torch.device("meta"):
        model = DiffusionGemma(config)
        vision = None if language_model_only else _vision_for(config, files)
        if vision is not None:
            model.vision = vision
        scales = fp8.prepare(model, scheme, to_checkpoint_name) if scheme is not None else []
    shards = {}
    if tp is not None:  # [parallel]
        if scheme is not None:
            raise ValueError("tensor parallelism does not take FP8 weights yet: drop --quantization fp8 or use TP 1")
        from . import parallel
        shards = {to_checkpoint_name(n): s for n, s in parallel.shard_model(model, tp).items()}
    expected = {to_checkpoint_name(n): n for n in list(dict(model.named_parameters())) +
                [n for n, _ in model.named_buffers() if "inv_freq" not in n]}
    if quantize:  # the scales are computed, not read
        for n in scales:
            del expected[to_checkpoint_name(n)]
    experts = fp8.ExpertStacker() if scheme is not None and not quantize else None
    found: set[str] = set()
    unexpected, passthrough = [], {}
    progress = _progress(files)
    try:
        for file in files:
            _load_file(model, file, expected, want, target, found, unexpected, passthrough, experts, shards)
            if progress is not None:
                progress.advance(progress.task_ids[0], file.stat().st_size)
    finally:
        if progress is not None:
            progress.stop()
    if experts is not None:
        found |= {to_checkpoint_name(n) for n in experts.complete(model)}
    missing = sorted(set(expected) - found)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_names(sorted(unexpected))}")
        raise CheckpointError(f"{path}: checkpoint does not match its config.json - " + "; ".join(parts))
    if (not language_model_only and vision is None and any(n.startswith(_VISION[0]) for n in passthrough)
            and str(path) not in _vision_warned):
        _vision_warned.add(str(path))
        log.warning("%s has vision tensors but no vision_config: loading the text model only", path)
    model.reset_rope()  # non-persistent buffers are still on the meta device
    model.to(target)  # every weight is there already: this moves the RoPE tables only
    model.eval()
    if scheme is not None:
        fp8.prime(target)
    return Checkpoint(model, config, generation, path, passthrough, language_model_only)


def _load_file(model, file: Path, expected: dict, want, device: torch.device, found: set, unexpected: list,
               passthrough: dict, experts: fp8.ExpertStacker | None = None, shards: dict | None = None) -> None:
    """Move one shard's tensors into the meta-device model, each straight to `device` (vision tensors dgemma does
    not model are only noted, for save). `shards`: checkpoint name -> parallel.Shard, tensors of which only this
    rank's slices are read."""
    try:
        reader = WeightFile(file)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    with reader:
        for name in reader.names():
            if name == "lm_head.weight":
                continue  # tied to the embedding; some exporters write it anyway
            if name not in expected:
                m = experts is not None and fp8.ExpertStacker.PATTERN.match(name)
                if m and from_checkpoint_name(m["module"]) is not None:
                    try:
                        experts.take(model, from_checkpoint_name(m["module"]), int(m["e"]),
                                     m["proj"], m["kind"], _read(reader, name, device, None))
                    except (ValueError, AttributeError) as e:
                        raise CheckpointError(f"{file}: tensor {name}: {e}") from None
                elif name.startswith(_VISION):
                    passthrough[name] = file  # not modelled by dgemma: kept for save
                else:
                    unexpected.append(name)
                continue
            if shards and name in shards:  # [parallel] read this rank's slices only
                _assign(model, expected[name], _read_shard(reader, name, device, want, shards[name]), name, file)
            else:
                _assign_fp8(model, expected[name], reader, name, want, device)
            found.add(name)


def _assign_fp8(model, pname: str, reader: WeightFile, name: str, want, device: torch.device) -> None:
    """Assign one tensor; FP8 destinations take an FP8 weight and its scale as they are (the scale as fp32 [out, 1]),
    or a float weight quantised here, on the device, a slab of rows at a time (its scale computed alongside)."""
    file = reader.path
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    cur = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    is_scale = attr in fp8.SCALES and attr in mod._buffers
    if cur is None or not (fp8.is_quantized(cur) or is_scale):
        t = _read(reader, name, device, want)
        if fp8.is_quantized(t):
            raise CheckpointError(f"{file}: tensor {name} is FP8, but config.json has no FP8 quantization_config "
                                  "that covers it (is it on the ignore list?)")
        return _assign(model, pname, t, name, file)
    if fp8.is_quantized(cur) and not is_scale and reader.dtype(name) != fp8.FP8:  # quantise here
        if tuple(reader.entries[name].shape) != tuple(cur.shape):
            raise CheckpointError(f"{file}: tensor {name} has shape {tuple(reader.entries[name].shape)}, "
                                  f"config.json implies {tuple(cur.shape)}")
        try:
            t, scale = reader.read_quantized(name, device)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({e})") from None
        mod._buffers[attr + fp8.SCALE_SUFFIX] = scale
        return _assign(model, pname, t, name, file)
    t = _read(reader, name, device, None)
    if is_scale:
        try:
            t = fp8.channel_scale(t, cur.shape[-2])
        except ValueError as e:
            raise CheckpointError(f"{file}: tensor {name}: {e}") from None
    _assign(model, pname, t, name, file)


def _target(device: str | torch.device) -> torch.device:
    """The device to load onto, or a one-line ValueError when torch cannot put tensors there."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {device!r} cannot be used here ({why})") from None
    return dev


def _vision_for(config: ModelConfig, files: list[Path]):
    """The vision module (on the current device) when the checkpoint holds a vision tower, else None."""
    if not isinstance(config.raw.get("vision_config"), dict):
        return None
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if any(n.startswith(_VISION[0]) for n in f.keys()):
                    from .vision import Vision, VisionConfig
                    return Vision(VisionConfig.from_model_dict(config.raw, config.text.hidden_size, config.source))
        except CheckpointError:
            raise
        except Exception:
            return None  # an unreadable shard is reported, with its name, by the main loading loop
    return None


def _progress(files: list[Path], min_bytes: int = 2**30):
    """A progress bar over the shards for checkpoints of a gigabyte or more (small ones load in a blink)."""
    total = sum(f.stat().st_size for f in files)
    if total < min_bytes:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("loading weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   transient=True)
    bar.add_task("load", total=total)
    bar.start()
    return bar


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _read(reader: WeightFile, name: str, device: torch.device, want: torch.dtype | None) -> torch.Tensor:
    """One float or FP8 tensor on `device`, in `want` (None: the file's dtype; FP8 stays FP8)."""
    dtype = reader.dtype(name)
    if dtype not in FLOAT_DTYPES and dtype != fp8.FP8:
        raise CheckpointError(f"{reader.path}: tensor {name} has dtype {dtype}; expected float32, bfloat16 or "
                              "float16")
    try:
        return reader.read(name, device, None if dtype == fp8.FP8 else want)
    except Exception as e:
        raise CheckpointError(f"{reader.path}: tensor {name} cannot be read ({e}); the file may be truncated") \
            from None


def _read_shard(reader: WeightFile, name: str, device: torch.device, want: torch.dtype | None, shard) -> torch.Tensor:
    """[parallel] This rank's slices of a float tensor (`parallel.Shard.read` through the file's memory map), on
    `device` in `want` (None: the file's dtype)."""
    dtype = reader.dtype(name)
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{reader.path}: tensor {name} has dtype {dtype}; tensor parallelism takes float32, "
                              "bfloat16 or float16 tensors")
    try:
        t = shard.read(reader._mmap, name)
    except Exception as e:
        raise CheckpointError(f"{reader.path}: tensor {name} cannot be read as this rank's slice ({e})") from None
    return t.to(device=device, dtype=want or t.dtype)


def _assign(model: nn.Module, pname: str, t: torch.Tensor, name: str, file: Path) -> None:
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    cur = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    if cur is not None and tuple(cur.shape) != tuple(t.shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                              f"{tuple(cur.shape)}")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def save(model: DiffusionGemma, out: str | Path, generation: GenerationConfig | None = None,
         passthrough: dict[str, Path] | None = None, dtype: torch.dtype | None = None,
         max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the HF layout (config.json, generation_config.json, safetensors shards + index) atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {}
        for n, t in model.state_dict().items():
            if "inv_freq" not in n:
                tensors.update(fp8.checkpoint_layout(to_checkpoint_name(n), t))  # FP8 experts: per-expert weights
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            t = tensors[name].detach()
            if dtype is not None and not fp8.is_quantized(t) and not name.endswith("weight_scale"):
                t = t.to(dtype)
            t = t.contiguous().cpu()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger tensor (fused fast-path weights): save its own bytes
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        extra = _passthrough_shards(passthrough or {})
        all_shards = shards + extra
        weight_map, total = {}, 0
        n = len(all_shards)
        for i, shard in enumerate(all_shards):
            fname = WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
        if n > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))
        cfg = model.config.to_dict()
        cfg["dtype"] = str(dtype or model.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps((generation or GenerationConfig()).to_dict(), indent=2))
        if out.exists():
            backup = out.with_name(out.name + ".old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _passthrough_shards(passthrough: dict[str, Path]) -> list[dict[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for name, file in passthrough.items():
        by_file.setdefault(file, []).append(name)
    shards = []
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            shards.append({n: f.get_tensor(n) for n in sorted(names)})
    return shards


def resolve(model: str | Path) -> Path:
    """A local folder, or a Hugging Face Hub id fetched (or found in the local HF cache) with huggingface_hub."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a checkpoint folder, got a file")
        return p
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(model)) is None:
        raise CheckpointError(f"{model}: no such folder, and not a Hugging Face Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=str(model), allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]))
    except Exception as e:
        raise CheckpointError(f"{model}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no network?'}); pass a local folder "
                              "or set HF_HUB_OFFLINE=1 with the model in the local cache") from None


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "load", "save", "resolve", "parse_dtype"]
