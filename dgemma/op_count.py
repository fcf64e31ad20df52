"""Count what one engine step would launch on a GPU, measured on the CPU: non-view aten ops and host syncs.

    with count_ops() as c:
        engine.step()
    c.ops, c.syncs, c.top(10)

A `TorchDispatchMode` sees every aten op that reaches a kernel. Each one is, to a first approximation, one kernel
launch on a GPU, so the count is a launch proxy that needs no GPU. Views are left out: they only make a new tensor
header over the same storage and launch nothing. An op is a view when its schema says that its output aliases an
input without writing to it (`OpOverload.is_view`: view, _reshape_alias, slice, select, transpose, t, expand,
as_strided, unsqueeze, squeeze, permute, alias, detach, lift_fresh, split, chunk, unbind, narrow, unfold,
diagonal, ...; `reshape` and `flatten` reach the dispatcher as `view`, or as a counted `clone` plus
`_unsafe_view`), plus `_unsafe_view` (`EXTRA_VIEW_OPS`), which has no aliasing annotation but is also metadata only.
In-place and `out=` ops write through their alias and are counted.

Ops that are one kernel on a GPU but a composite on the CPU count once (`FUSED_ON_GPU`, seen by a
`TorchFunctionMode` before they decompose): `rms_norm` is `_fused_rms_norm` on CUDA, and pow, mean, add, rsqrt and
two muls on the CPU. Higher-order operators (`flex_attention`, which runs as a math composite in eager mode on the
CPU) count once too. (`_grouped_mm` and SDPA already reach the dispatcher as one op.)

A host sync is where the host waits for the device:
- `Tensor.tolist()` (wrapped; one sync per call, whatever the device, since the tensor would live on the GPU there),
- `aten._local_scalar_dense`, which `.item()`, `int(t)`, `float(t)` and `bool(t)` call,
- a blocking copy to the CPU from another device (`.cpu()`, `.to("cpu")`, `copy_` into a CPU tensor) without
  `non_blocking=True`. On a CPU-only run these cannot occur; the rule is here for runs on a GPU.
The copy that `tolist()` makes of a device tensor is part of that one sync, not a second one. On a CPU run every
tensor is a host tensor, so a scalar read of host-side bookkeeping (a CPU tensor of slots or lengths) counts too,
although on a GPU it would not wait for the device: such bookkeeping belongs in Python values.

`build_tiny_model` and `count_decode_step`, below, build the released 26B-A4B structure at tiny widths and count
one decode step: the benchmark (benchmarks/step_ops.py) and the guard test (tests/test_step_ops.py) both use them.
They count the eager ops (torch.compile does not run under a dispatch mode), so an engine with a compile option is
counted with it off.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

EXTRA_VIEW_OPS = frozenset({"_unsafe_view"})  # metadata-only ops whose schema carries no alias annotation
SCALAR_READ_OPS = frozenset({"_local_scalar_dense"})  # .item(), int(t), float(t), bool(t)
FUSED_ON_GPU = {F.rms_norm: "rms_norm", torch.rms_norm: "rms_norm",  # function -> the one op it counts as
                torch.ops.aten._fused_rms_norm: "rms_norm", torch.ops.aten._fused_rms_norm.default: "rms_norm"}


def is_view(func) -> bool:
    """True for aten ops that return an alias of an input without writing it (no kernel launch)."""
    return bool(getattr(func, "is_view", False)) or func.overloadpacket.__name__ in EXTRA_VIEW_OPS


def is_blocking_host_copy(func, args, kwargs) -> bool:
    """True for a copy from a non-CPU device into CPU memory that is not `non_blocking`."""
    name = func.overloadpacket.__name__
    if name in ("_to_copy", "to"):
        src = args[0] if args else kwargs.get("self")
        dst = kwargs.get("device")
        non_blocking = kwargs.get("non_blocking", False)
    elif name == "copy_":
        dst_t = args[0] if args else kwargs.get("self")
        src = args[1] if len(args) > 1 else kwargs.get("src")
        dst = dst_t.device if isinstance(dst_t, torch.Tensor) else None
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return False
    if not isinstance(src, torch.Tensor) or dst is None:
        return False
    return torch.device(dst).type == "cpu" and src.device.type != "cpu" and not non_blocking


@dataclass
class OpCounts:
    """What ran inside one `count_ops()` block."""

    ops: int = 0  # non-view aten ops (launch proxy)
    syncs: int = 0  # host syncs
    by_op: Counter = field(default_factory=Counter)  # non-view op name -> count
    by_sync: Counter = field(default_factory=Counter)  # "tolist" / "_local_scalar_dense" / "copy_to_cpu" -> count
    sync_sites: Counter = field(default_factory=Counter)  # "dgemma/file.py:line function" of each sync -> count

    def top(self, n: int = 10) -> dict[str, int]:
        return dict(self.by_op.most_common(n))

    def add_sync(self, kind: str) -> None:
        self.syncs += 1
        self.by_sync[kind] += 1
        self.sync_sites[_caller()] += 1


def _caller() -> str:
    """The innermost frame of the calling code outside this file and torch (where a sync comes from)."""
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename.replace("\\", "/")
        if f != __file__ and "/torch/" not in f and "/contextlib.py" not in f:
            parts = f.split("/")
            short = "/".join(parts[-2:]) if len(parts) > 1 else f
            return f"{short}:{frame.lineno} {frame.name}"
    return "?"


class _Fused(TorchFunctionMode):
    """Counts a `FUSED_ON_GPU` function as one op and tells `_Counting` to skip the ops it decomposes into."""

    def __init__(self, counts: OpCounts, state: threading.local):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = FUSED_ON_GPU.get(func)
        if name is None or getattr(self.state, "fused", False):
            return func(*args, **(kwargs or {}))
        self.counts.ops += 1
        self.counts.by_op[name] += 1
        self.state.fused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.state.fused = False


class _Counting(TorchDispatchMode):
    supports_higher_order_operators = True  # flex_attention & co. count as one op (one fused kernel on a GPU)

    def __init__(self, counts: OpCounts, state: threading.local):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counts
        if isinstance(func, torch._ops.HigherOrderOperator):
            if not getattr(self.state, "fused", False):
                c.ops += 1
                c.by_op[func.name()] += 1
            return func(*args, **kwargs)  # this mode is off inside: the ops it runs on the CPU are not counted
        if not is_view(func) and not getattr(self.state, "fused", False):
            name = func.overloadpacket.__name__
            c.ops += 1
            c.by_op[name] += 1
            if not getattr(self.state, "in_tolist", False):  # tolist's own copy/reads belong to its one sync
                if name in SCALAR_READ_OPS:
                    c.add_sync(name)
                elif is_blocking_host_copy(func, args, kwargs):
                    c.add_sync("copy_to_cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_ops():
    """Count non-view aten ops and host syncs of the code in the block (this thread). Yields an `OpCounts`."""
    counts, state = OpCounts(), threading.local()
    original = torch.Tensor.tolist

    def tolist(self, *a, **k):
        if getattr(state, "in_tolist", False):
            return original(self, *a, **k)
        counts.add_sync("tolist")
        state.in_tolist = True
        try:
            return original(self, *a, **k)
        finally:
            state.in_tolist = False

    own = "tolist" in vars(torch.Tensor)  # False: inherited from the C base class
    torch.Tensor.tolist = tolist
    try:
        # torch.compile cannot trace under a dispatch mode (nor can eager flex_attention, which compiles its
        # operator internally): inside the block compiled functions run eagerly, and their eager ops are counted.
        with torch.compiler.set_stance("force_eager"), _Fused(counts, state), _Counting(counts, state):
            yield counts
    finally:
        if own:
            torch.Tensor.tolist = original
        else:
            del torch.Tensor.tolist


# MARK: the released structure at tiny widths

# Widths shrink; everything that decides how many ops run keeps its released value: 30 layers in the released
# sliding/full pattern, 16 query heads with 8 (sliding) and 2 (full) KV heads, 128 experts with top-8 routing,
# sliding window 1,024, canvas 256. Head sizes keep the released ratio (full = 2 x sliding).
TINY_WIDTHS = dict(hidden_size=64, intermediate_size=64, head_dim=16, global_head_dim=32, moe_intermediate_size=16,
                   num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1)
DEFAULT_VOCAB = 4096


def tiny_release_config(layers: int = 30, vocab: int = DEFAULT_VOCAB, canvas: int = 256):
    """`ModelConfig` of the released 26B-A4B structure at tiny widths (`TINY_WIDTHS`)."""
    from .config import ModelConfig, release_26b_a4b_text

    text = release_26b_a4b_text(num_hidden_layers=layers, vocab_size=vocab, **TINY_WIDTHS)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text,
                                  "eos_token_id": [1, 106 % vocab, 50 % vocab]})


def build_tiny_model(layers: int = 30, vocab: int = DEFAULT_VOCAB, canvas: int = 256, seed: int = 0,
                     dtype: torch.dtype = torch.float32):
    """A random `DiffusionGemma` of `tiny_release_config`, on the CPU, in eval mode."""
    from .model import DiffusionGemma

    model = DiffusionGemma(tiny_release_config(layers, vocab, canvas))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def count_decode_step(model, batch: int, batch_invariant: bool, prompt_len: int = 1024, warmup: int = 2,
                      seed: int = 0) -> OpCounts:
    """Ops and syncs of one `Engine.step()` in which all `batch` rows denoise.

    `batch` requests with `prompt_len`-token random prompts are prefilled, then `warmup` steps that denoise every
    row run (the first one of a canvas has no self-conditioning signal yet, so two are needed to reach the steady
    state), then one more step is counted. No request can finish in between: the confidence threshold is 0 and
    the step budget is larger than the steps taken.
    """
    from .engine import Engine, EngineConfig
    from .sampling_params import SamplingParams

    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the first denoising step), got {warmup}")
    C, V = model.config.canvas_length, model.text.vocab_size
    # The budget is defined on the eager ops (and compiled code runs eagerly inside count_ops anyway).
    eager = {"compile": False} if "compile" in {f.name for f in fields(EngineConfig)} else {}
    engine = Engine(model, eos_token_ids=[], config=EngineConfig(
        max_num_seqs=batch, max_model_len=prompt_len + 2 * C, batch_invariant=batch_invariant, **eager))
    g = torch.Generator().manual_seed(seed)
    for i in range(batch):
        prompt = torch.randint(3, V, (prompt_len,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=C, max_denoising_steps=warmup + 8,
                                                  confidence_threshold=0.0, seed=seed + i, ignore_eos=True))
    stats = getattr(engine, "stats", None)
    if not isinstance(stats, dict) or not {"decoder_forwards", "forwards"} <= stats.keys():
        raise RuntimeError("count_decode_step reads Engine.stats['decoder_forwards'] and ['forwards'] to know which "
                           "step denoises every row; this engine has no such counters")
    decoded = lambda: engine.stats["decoder_forwards"]  # noqa: E731
    for _ in range(64):  # prefill (however the engine chunks it) until a step denoises every row
        before = decoded()
        _check_events(engine.step(), "prefill")
        if decoded() - before == batch:
            break
    else:
        raise RuntimeError(f"no step denoised all {batch} rows within 64 steps")
    for _ in range(warmup - 1):
        _check_events(engine.step(), "warm-up step")
    before = (decoded(), engine.stats["forwards"])
    with count_ops() as counts:
        _check_events(engine.step(), "counted step")
    ran = (decoded() - before[0], engine.stats["forwards"] - before[1])
    if ran != (batch, 1):
        raise RuntimeError(f"the counted step was not one forward with {batch} denoising rows: {ran}")
    return counts


def _check_events(events, where: str) -> None:
    bad = [e.kind for e in events if e.kind in ("commit", "finished")]
    if bad:
        raise RuntimeError(f"a request committed or finished during the {where} ({bad}); the count would be wrong")
