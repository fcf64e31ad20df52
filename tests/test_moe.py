"""The mixture of experts on its own: both modes (exact per-expert tiles, fast grouped GEMMs) against each other and
against transformers' default `grouped_mm` experts, with empty experts, gradients, op counts and torch.compile."""

import collections

import pytest
import torch
from helpers import tiny_text_config
from torch.utils._python_dispatch import TorchDispatchMode

from dgemma import batch_invariant
from dgemma.config import ModelConfig
from dgemma.moe import Experts

MODES = {"exact": True, "fast": False}


def make_experts(num_experts: int, top_k: int, seed: int, dtype=torch.float32) -> Experts:
    text = tiny_text_config(num_experts=num_experts, top_k_experts=top_k)
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 8, "text_config": text}).text
    experts = Experts(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.15, generator=g)
    return experts.to(dtype)


def routing(n: int, num_experts: int, top_k: int, seed: int, dtype=torch.float32, used: int | None = None):
    """Random tokens and router outputs; only the first `used` experts are ever picked (the rest stay empty)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, used or num_experts, generator=g)
    weights, idx = scores.topk(top_k, dim=-1)
    return torch.randn(n, 64, generator=g).to(dtype), weights / weights.sum(-1, keepdim=True), idx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run(experts, x, weights, idx, mode: str) -> torch.Tensor:
    with batch_invariant.mode(MODES[mode]):
        return experts(x, weights, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fast_mode_equals_transformers_grouped_mm_experts_bit_for_bit(dtype):
    """Same grouped GEMMs, the weights applied in fp32 and the k outputs summed in fp32 then rounded once: the bf16
    output is transformers' to the bit (a bf16 running sum over k differs from it by one bf16 step in places)."""
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    for seed, (e, k, n) in enumerate([(8, 2, 5), (8, 3, 40), (16, 4, 33), (4, 2, 64)]):
        cfg = DiffusionGemmaTextConfig(**tiny_text_config(num_experts=e, top_k_experts=k))
        cfg._experts_implementation = "grouped_mm"  # what from_pretrained picks by default, on CPU too
        ref = DiffusionGemmaTextExperts(cfg)
        mine = make_experts(e, k, seed, dtype)
        ref.load_state_dict({n: p.float() for n, p in mine.state_dict().items()})
        ref.to(dtype)
        x, weights, idx = routing(n, e, k, seed, dtype)
        assert torch.equal(run(mine, x, weights, idx, "fast"), ref(x, idx, weights)), (e, k, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_and_fast_modes_agree_with_empty_experts_and_no_tokens(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    experts = make_experts(16, 4, seed=0, dtype=dtype)
    for n, used in ((1, 4), (5, 6), (37, 16), (3, 16)):  # at most `used` experts hit: the others get zero rows
        x, weights, idx = routing(n, 16, 4, seed=n, dtype=dtype, used=used)
        with torch.no_grad():
            exact, fast = run(experts, x, weights, idx, "exact"), run(experts, x, weights, idx, "fast")
        assert exact.dtype == fast.dtype == dtype and exact.shape == fast.shape == x.shape
        assert rel_err(fast, exact) <= tol, n
    x, weights, idx = routing(0, 16, 4, seed=0, dtype=dtype)
    for mode in MODES:
        assert run(experts, x, weights, idx, mode).shape == (0, 64)


def test_fast_mode_gradients_equal_the_exact_modes():
    """Training runs with batch invariance off, so the grouped path must backpropagate: inputs, routing weights and
    both expert tensors (an expert no token picked gets an exact zero gradient)."""
    experts = make_experts(8, 2, seed=1)
    x, weights, idx = routing(11, 8, 2, seed=1, used=6)
    grads = {}
    for mode in MODES:
        experts.zero_grad()
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        run(experts, xg, wg, idx, mode).square().sum().backward()
        grads[mode] = [xg.grad, wg.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    for exact, fast in zip(grads["exact"], grads["fast"]):
        assert rel_err(fast, exact) <= 1e-5
    assert grads["fast"][2][6:].abs().max() == 0 and grads["fast"][3][6:].abs().max() == 0


def test_fast_mode_under_bf16_autocast_with_fp32_weights():
    """Training on CUDA runs fp32 weights under bf16 autocast, where activations arrive in bf16 or fp32. grouped_mm
    is not autocast-aware, so the fast path casts as F.linear would: it then computes exactly what a bf16 copy of
    the experts computes, and the fp32 weights get their gradients."""
    experts = make_experts(8, 2, seed=4)
    bf16 = make_experts(8, 2, seed=4, dtype=torch.bfloat16)
    x, weights, idx = routing(9, 8, 2, seed=4)
    with torch.no_grad():
        want = run(bf16, x.bfloat16(), weights, idx, "fast")
    for dtype in (torch.bfloat16, torch.float32):
        experts.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(experts, x.to(dtype), weights, idx, "fast")
        assert torch.equal(out.bfloat16(), want), dtype
        out.float().square().sum().backward()
        assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.down_proj.grad.abs().max() > 0


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_fast_mode_is_a_few_ops_whatever_the_number_of_experts():
    """At the real routing (128 experts, top 8) one fast MoE call is a fixed handful of ops, with no per-expert
    work and no host read-back; the exact mode still does one matmul pair per expert hit."""
    experts = make_experts(128, 8, seed=2, dtype=torch.bfloat16)
    x, weights, idx = routing(256, 128, 8, seed=2, dtype=torch.bfloat16)
    counts = {}
    for mode in MODES:
        with CountOps() as c:
            run(experts, x, weights, idx, mode)
        counts[mode] = c.ops
    fast = counts["fast"]
    assert sum(fast.values()) <= 15, fast
    assert fast["_grouped_mm"] == 2 and "mm" not in fast and "bincount" not in fast
    assert "_local_scalar_dense" not in fast
    assert counts["exact"]["mm"] >= 2 * len(idx.unique())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fast_mode_compiles_as_one_graph(dtype):
    """fullgraph=True fails on any graph break, and a host read-back (.tolist(), .item()) is one."""
    torch._dynamo.reset()
    experts = make_experts(16, 4, seed=3, dtype=dtype)
    compiled = torch.compile(experts, fullgraph=True, backend="eager")
    for n in (10, 23):
        x, weights, idx = routing(n, 16, 4, seed=n, dtype=dtype, used=12)
        with batch_invariant.mode(False):
            assert torch.equal(compiled(x, weights, idx), experts(x, weights, idx))
