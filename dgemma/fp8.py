"""FP8 weights: the compressed-tensors `float-quantized` format, quantisation on load, and the FP8 matrix products.

Layout in memory (and in a checkpoint): a quantised weight is float8_e4m3fn with one fp32 scale per output row,
weight = fp8 * scale (a per-tensor scale is read as that scale on every row: the same numbers). Linear layers keep
their name (`q_proj.weight`) and gain `weight_scale` [out, 1]; the experts keep their stacked tensors
(`gate_up_proj` [E, 2M, H] fp8) with `gate_up_proj_scale` [E, 2M, 1] and `down_proj_scale` [E, H, 1]. In a
compressed-tensors checkpoint the experts are per-expert 2-D Linear weights (`experts.{e}.gate_proj.weight`,
`.weight_scale`, `up_proj`, `down_proj`), the layout llm-compressor writes and vLLM reads; the loader stacks them.

Activations are quantised dynamically per token (one scale per row, at run time), as the FP8-dynamic scheme says.

Compute:
- on CUDA with compute capability 8.9 or newer, bf16 activations and dims that are multiples of 16, dense layers run
  `torch._scaled_mm` on fp8 activations (row-wise scales) and fp8 weights (per-channel scales), fast mode only;
- elsewhere (the CPU, exact mode) a dense weight is dequantised per use, fp8 -> fp32 * scale -> the activation
  dtype, and the ordinary matmul runs;
- the experts in fast mode, on CUDA sm90/sm100 with bf16 activations, run `torch._scaled_grouped_mm` on per-token
  fp8 activations and the fp8 stacks with their per-channel scales (`scaled_grouped_mm`); elsewhere (the documented
  fallback) they cast the stack to the activation dtype (exact), run the two grouped GEMMs and multiply each output
  column by its expert's row scale (moe.Experts._grouped). Either way: no host sync, no loop over experts. In exact
  mode the experts hit are dequantised per use.

Quantisation on load reads the float tensor a slab of rows at a time onto the target device
(`weight_file.WeightFile.read_quantized`) and quantises each slab there.

Not quantised (the default ignore list of `--quantization fp8`): the router, the self-conditioning block, the
vision tower, and everything that is not a Linear or the experts (embeddings, norms, scalars).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
DEFAULT_IGNORE = ("re:.*\\.router\\..*", "re:.*self_conditioning.*", "re:.*vision.*", "lm_head")
SCALE_SUFFIX = "_scale"
SCALES = ("weight_scale", "gate_up_proj_scale", "down_proj_scale")  # the scale buffers' names


class Fp8FormatError(ValueError):
    """A quantization_config dgemma cannot run (not compressed-tensors FP8 with dynamic activations)."""


# MARK: the scheme


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 weights with per-channel scales, dynamic per-token FP8 activations (compressed-tensors FP8_DYNAMIC).
    `ignore`: module names (checkpoint names) or `re:` patterns kept in the checkpoint's float dtype."""

    ignore: tuple[str, ...] = DEFAULT_IGNORE
    dynamic_activations: bool = True  # False: weight-only FP8 (the activations stay in bf16/fp32)

    def ignored(self, module: str) -> bool:
        return any(re.match(t[3:], module) is not None if t.startswith("re:") else t == module for t in self.ignore)

    @classmethod
    def from_config(cls, raw: dict) -> Fp8Scheme | None:
        """The scheme of a config.json's `quantization_config`; None when there is none."""
        qc = raw.get("quantization_config")
        if qc is None:
            return None
        where = "config.json quantization_config"
        if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise Fp8FormatError(f"{where}: dgemma reads compressed-tensors FP8 checkpoints only; got {method!r}")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise Fp8FormatError(f"{where}: expected one config group, got {len(groups)}")
        group = next(iter(groups.values()))
        fmt = group.get("format") or qc.get("format")
        if fmt != "float-quantized":
            raise Fp8FormatError(f"{where}: format {fmt!r} is not supported (only float-quantized)")
        if "Linear" not in (group.get("targets") or []):
            raise Fp8FormatError(f"{where}: targets {group.get('targets')} do not include Linear")
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("symmetric", True), w.get("dynamic", False)) != \
                (8, "float", True, False) or w.get("strategy") not in ("channel", "tensor"):
            raise Fp8FormatError(f"{where}: weights must be static symmetric 8-bit float with a channel or tensor "
                                 f"strategy; got {w}")
        a = group.get("input_activations")
        if a is not None and ((a.get("num_bits"), a.get("type"), a.get("dynamic")) != (8, "float", True)
                              or a.get("strategy") not in ("token", "tensor")):
            raise Fp8FormatError(f"{where}: input activations must be dynamic 8-bit float (static activation scales "
                                 f"are not supported); got {a}")
        if group.get("output_activations") is not None:
            raise Fp8FormatError(f"{where}: output activation quantisation is not supported")
        return cls(ignore=tuple(qc.get("ignore") or ()), dynamic_activations=a is not None)

    def to_config(self) -> dict:
        """config.json's `quantization_config` for this scheme (compressed-tensors FP8_DYNAMIC, per-channel)."""
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
               "actorder": None, "observer": None, "observer_kwargs": {}}
        group = {"targets": ["Linear"], "format": "float-quantized",
                 "weights": {**fp8, "strategy": "channel", "dynamic": False},
                 "input_activations": {**fp8, "strategy": "token", "dynamic": True} if self.dynamic_activations
                 else None, "output_activations": None}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": group}, "ignore": list(self.ignore), "kv_cache_scheme": None}


# MARK: quantise, dequantise


def quantize(w: torch.Tensor, chunk_elements: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] float -> (fp8 [..., out, in], fp32 scale [..., out, 1]): one scale per output row, the row's
    largest magnitude mapped to 448 (an all-zero row gets scale 1). Rows go a few MB at a time, and each chunk makes
    one fp32 temporary (the division promotes), so quantising a large tensor holds no fp32 copy of it. Checkpoints
    quantise on load through `weight_file.WeightFile.read_quantized`, a slab of rows from the file at a time."""
    rows = w.reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=FP8, device=w.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=w.device)
    step = max(1, chunk_elements // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        part = rows[i:i + step]
        amax = torch.maximum(part.amax(dim=-1, keepdim=True), -part.amin(dim=-1, keepdim=True)).float()
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q[i:i + step] = torch.div(part, s).clamp_(-FP8_MAX, FP8_MAX)  # part / s is computed in fp32
        scale[i:i + step] = s
    return q.view(w.shape), scale.view(*w.shape[:-1], 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [..., out, in] * fp32 scale [..., out, 1] -> dtype. The product is exact in fp32 (4 + 24 bits); one
    rounding to `dtype`, as compressed-tensors' dequantisation."""
    return (q.float() * scale).to(dtype)


def channel_scale(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's weight_scale ([rows, 1], [rows], [1] or [] for per-tensor) as fp32 [rows, 1]."""
    t = t.float().reshape(-1, 1)
    if t.shape[0] not in (1, rows):
        raise ValueError(f"weight_scale has {t.shape[0]} values for {rows} rows")
    return t.expand(rows, 1).contiguous()


def is_quantized(t: torch.Tensor) -> bool:
    return t.dtype == FP8


# MARK: the model in FP8 layout


def _targets(model: nn.Module, scheme: Fp8Scheme, checkpoint_name: Callable[[str], str]):
    """(dgemma module name, module, weight attributes) of every Linear and Experts of the text model that the
    scheme quantises."""
    from .batch_invariant import Linear
    from .moe import Experts

    for name, mod in model.named_modules():
        if name.startswith("vision") or not isinstance(mod, (Linear, Experts)):
            continue
        if not scheme.ignored(checkpoint_name(name + ".weight").rpartition(".")[0]):
            yield name, mod, ("weight",) if isinstance(mod, Linear) else ("gate_up_proj", "down_proj")


def prepare(model: nn.Module, scheme: Fp8Scheme, checkpoint_name: Callable[[str], str]) -> list[str]:
    """Turn the (meta-device) model's Linear and Experts weights not on the ignore list into FP8 parameters with
    fp32 scale buffers (empty, to be loaded). Returns the dgemma names of the new scale buffers."""
    scales = []
    for name, mod, attrs in _targets(model, scheme, checkpoint_name):
        for attr in attrs:
            w = getattr(mod, attr)
            setattr(mod, attr, nn.Parameter(torch.empty(w.shape, dtype=FP8, device=w.device), requires_grad=False))
            setattr(mod, attr + SCALE_SUFFIX, torch.empty(*w.shape[:-1], 1, dtype=torch.float32, device=w.device))
            scales.append(f"{name}.{attr}{SCALE_SUFFIX}")
        mod.fp8_activations = scheme.dynamic_activations
    return scales


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: Fp8Scheme | None = None) -> nn.Module:
    """Quantise a float model in place, one tensor at a time (for models built in memory; checkpoints quantise as
    they load). Its config then carries the scheme's quantization_config, so `checkpoint.save` writes FP8."""
    from dataclasses import replace

    from .checkpoint import to_checkpoint_name

    scheme = scheme or Fp8Scheme()
    for _, mod, attrs in _targets(model, scheme, to_checkpoint_name):
        for attr in attrs:
            q, scale = quantize(getattr(mod, attr))
            setattr(mod, attr, nn.Parameter(q, requires_grad=False))
            setattr(mod, attr + SCALE_SUFFIX, scale)
        mod.fp8_activations = scheme.dynamic_activations
    prime(next(model.parameters()).device)
    for m in model.modules():  # fused fast-path weights were views of the float ones: rebuilt on the next fuse
        if getattr(m, "fused", None) is not None:
            m.fused = None
    model.config = replace(model.config, raw={**model.config.raw, "quantization_config": scheme.to_config()})
    return model


def weight_bytes(config, dtype: torch.dtype, scheme: Fp8Scheme | None = None) -> int:
    """Bytes of the text model's parameters and buffers in FP8 layout (the rest in `dtype`), counted on the meta
    device: what the memory plan charges for an FP8 model."""
    from .checkpoint import to_checkpoint_name
    from .model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
        prepare(model, scheme or Fp8Scheme(), to_checkpoint_name)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and persistent buffers (scales included), each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class ExpertStacker:
    """Per-expert 2-D tensors of a compressed-tensors checkpoint (`...experts.{e}.{gate,up,down}_proj.weight` and
    `.weight_scale`) copied into dgemma's stacked [E, ...] experts, one at a time."""

    PATTERN = re.compile(r"^(?P<module>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                         r"(?P<kind>weight|weight_scale)$")

    def __init__(self):
        self.pieces: dict[str, set] = defaultdict(set)  # stacked dgemma name -> pieces seen

    def take(self, model: nn.Module, module: str, e: int, proj: str, kind: str, t: torch.Tensor) -> None:
        mod = model.get_submodule(module)
        attr = "down_proj" if proj == "down_proj" else "gate_up_proj"
        target = attr if kind == "weight" else attr + SCALE_SUFFIX
        cur = getattr(mod, target)
        if cur.is_meta:  # the first piece: the stacked tensor becomes real, on the pieces' device
            cur = torch.empty(cur.shape, dtype=cur.dtype, device=t.device)
            if kind == "weight":
                mod._parameters[attr] = nn.Parameter(cur, requires_grad=False)
            else:
                mod._buffers[target] = cur
        rows = cur.shape[1] // 2 if attr == "gate_up_proj" else cur.shape[1]
        start = rows if proj == "up_proj" else 0
        if not 0 <= e < cur.shape[0]:
            raise ValueError(f"expert {e} out of range (the config has {cur.shape[0]} experts)")
        if kind == "weight_scale":
            t = channel_scale(t, rows)
        elif t.dtype != FP8:
            raise ValueError(f"expert weight has dtype {t.dtype}, expected {FP8} (scale present)")
        if tuple(t.shape) != (rows, cur.shape[2]):
            raise ValueError(f"expert tensor has shape {tuple(t.shape)}, config.json implies {(rows, cur.shape[2])}")
        cur[e, start:start + rows] = t
        self.pieces[f"{module}.{target}"].add((e, proj))

    def complete(self, model: nn.Module) -> set[str]:
        """dgemma names of stacked tensors whose every piece arrived."""
        done = set()
        for name, got in self.pieces.items():
            mod_name, _, attr = name.rpartition(".")
            n = model.get_submodule(mod_name).down_proj.shape[0]
            projs = ("down_proj",) if attr.startswith("down_proj") else ("gate_proj", "up_proj")
            if got == {(e, p) for e in range(n) for p in projs}:
                done.add(name)
        return done


# MARK: FP8 matrix products on CUDA


def scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `scaled_linear` can run: CUDA sm89+, bf16 activations, both dims multiples of 16."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
            and _capability(x.device) >= (8, 9))


_CAPABILITY: dict = {}  # CUDA device -> compute capability, filled eagerly (`prime`) so compiled code only reads it


def _capability(device: torch.device) -> tuple[int, int]:
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITY[device]


def prime(device: torch.device | str) -> None:
    """Look up a CUDA device's capability now, outside any traced code (checkpoint.load and quantize_model do)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        _capability(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 activations: x [M, K] -> (fp8 [M, K], fp32 scale [M, 1]), each row's largest magnitude
    at 448, computed on the device (no host sync). The numbers of `quantize` for every row that is not all zero."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 @ fp8 w [N, K]^T with per-channel w_scale [N, 1]: x is quantised per token, then one
    `torch._scaled_mm` with row-wise scales, bf16 out.
    The tests run it through torch's CPU `_scaled_mm`; the CUDA kernel itself never ran here (no GPU)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], w.shape[0])
    xq, x_scale = quantize_tokens(x2)
    out = torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1), out_dtype=x.dtype)
    return out.reshape(*shape[:-1], w.shape[0])


GROUPED_CAPABILITIES = ((9, 0), (10, 0))  # where torch's _scaled_grouped_mm has a kernel (not sm89, not sm120)


def scaled_grouped_mm_ok(x: torch.Tensor, *stacks: torch.Tensor) -> bool:
    """Whether `scaled_grouped_mm` can run for these expert stacks: CUDA sm90 or sm100, bf16 activations, every
    stack's two matrix dims multiples of 16, and a torch that has the op."""
    return x.is_cuda and grouped_supported(_capability(x.device), x.dtype, *(w.shape for w in stacks))


def grouped_supported(capability: tuple[int, int], dtype: torch.dtype, *shapes) -> bool:
    """`scaled_grouped_mm_ok` for a device of this capability (the rule itself, testable without a GPU)."""
    return (capability in GROUPED_CAPABILITIES and dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
            and all(s[-1] % 16 == 0 and s[-2] % 16 == 0 for s in shapes))


def scaled_grouped_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The FP8 experts' grouped GEMM on CUDA: rows of x [S, K] bf16, sorted by expert, group g ending at offs[g]
    (int32, on the device), times fp8 w[g] [N, K]^T with per-channel w_scale [G, N, 1] -> [S, N] bf16. x is quantised
    per token (row-wise scales [S]), then one `torch._scaled_grouped_mm`: out[s, n] = sum_k xq[s, k] wq[g, n, k] *
    x_scale[s] * w_scale[g, n]. Layouts as the kernel wants them: xq row-major, w.transpose(1, 2) column-major
    [G, K, N] (a view: no copy of the stack), scales fp32 [S] and [G, N]. No host sync, no loop over experts.
    The CUDA kernel never ran here (no GPU): the tests run this through a dequantised reference of the op."""
    xq, x_scale = quantize_tokens(x)
    return torch._scaled_grouped_mm(xq, w.transpose(1, 2), x_scale.reshape(-1), w_scale[..., 0], offs=offs,
                                    out_dtype=torch.bfloat16)


# MARK: saving


_STACKED = re.compile(r"^(?P<module>.+\.experts)\.(?P<attr>gate_up_proj|down_proj)(?P<scale>_scale)?$")


def checkpoint_layout(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of the model (checkpoint name) as the compressed-tensors checkpoint holds it: FP8 stacked experts
    and their scales become per-expert 2-D Linear weights (`experts.{e}.gate_proj.weight`, `.weight_scale`, ...);
    anything else is kept as it is."""
    m = _STACKED.match(name)
    if m is None or (m["scale"] is None and not is_quantized(t)):
        return {name: t}
    leaf = "weight_scale" if m["scale"] else "weight"
    out = {}
    for e in range(t.shape[0]):
        if m["attr"] == "down_proj":
            out[f"{m['module']}.{e}.down_proj.{leaf}"] = t[e]
        else:
            gate, up = t[e].chunk(2, dim=0)
            out[f"{m['module']}.{e}.gate_proj.{leaf}"], out[f"{m['module']}.{e}.up_proj.{leaf}"] = gate, up
    return out
