"""Can the parity tests fail? Break one model detail at a time and see which tests catch it.

    python scripts/mutation_check.py                 # all mutations, prints a table, writes scripts/mutation_check.json
    python scripts/mutation_check.py rope_theta      # one mutation

Each mutation monkeypatches one component of dgemma (a RoPE frequency, the router input, a layer scalar, the
soft-cap, the K=V rule, the sliding window, ...) in a fresh Python process, then runs the oracle parity tests.
A mutation that no test catches is a hole in the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_model_parity.py", "tests/test_generate_parity.py", "tests/test_checkpoint.py"]

# name -> (description, python source applied before the tests import dgemma's modules)
MUTATIONS = {
    "rope_theta": ("sliding-layer RoPE base 10,000 -> 10,100", """
import dgemma.rope as r
orig = r.inv_frequencies
def f(rope, d):
    from dataclasses import replace
    return orig(replace(rope, theta=rope.theta * 1.01) if rope.rope_type == "default" else rope, d)
r.inv_frequencies = f
import dgemma.model as m; m.inv_frequencies = f
"""),
    "proportional_rope_denominator": ("proportional RoPE exponents over the rotated dims, not the full head", """
import torch, dgemma.rope as r, dgemma.model as m
orig = r.inv_frequencies
def f(rope, d):
    if rope.rope_type != "proportional":
        return orig(rope, d)
    k = int(rope.partial_rotary_factor * d // 2)
    inv = 1.0 / (rope.theta ** (torch.arange(0, 2 * k, 2, dtype=torch.float32) / (2 * k)))
    return torch.cat([inv, torch.zeros(d // 2 - k)])
r.inv_frequencies = m.inv_frequencies = f
"""),
    "router_on_normed_input": ("router reads the experts' pre-norm output instead of the raw residual", """
import dgemma.moe as moe, dgemma.model as m
orig = moe.Experts.forward
def experts(self, x, weights, idx):  # x is pre_feedforward_layernorm_2(h): route on it instead
    return orig(self, x, *moe.Router.forward(self._router, x))
moe.Experts.forward = experts
init = m.Layer.__init__
def layer_init(self, cfg, index):
    init(self, cfg, index)
    object.__setattr__(self.experts, "_router", self.router)
m.Layer.__init__ = layer_init
"""),
    "router_no_renormalise": ("top-k router weights not renormalised to sum 1", """
import torch, dgemma.moe as moe
def fwd(self, residual):
    scores = self.proj(self.norm(residual) * self.scale * self.root)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, self.top_k, dim=-1)
    return w * self.per_expert_scale[idx], idx
moe.Router.forward = fwd
"""),
    "decoder_scalar_in_encoder": ("encoder mode uses the decoder's layer_scalar", """
import torch, dgemma.model as m
orig = m.Layer.forward
def fwd(self, x, segments, cos, sin, is_decoder):
    return orig(self, x, segments, cos, sin, torch.ones_like(is_decoder))
m.Layer.forward = fwd
"""),
    "no_softcap": ("final logit soft-cap skipped", """
import dgemma.model as m
from dgemma.batch_invariant import linear
m.DiffusionGemma.logits = lambda self, h: linear(h, self.embed_tokens.weight).float()
"""),
    "v_after_k_norm": ("K=V rule: V taken after k_norm instead of the raw k_proj output", """
import dgemma.model as m
from dgemma.rope import apply_rope
def qkv(self, x, cos, sin):
    t, d = x.shape[0], self.head_dim
    q = apply_rope(self.q_norm(self.q_proj(x).view(t, self.heads, d)), cos, sin)
    kn = self.k_norm(self.k_proj(x).view(t, self.kv_heads, d))
    v = self.v_proj(x).view(t, self.kv_heads, d) if self.v_proj is not None else kn
    return q, apply_rope(kn, cos, sin), self.v_norm(v)
m.SelfAttention.qkv = qkv
"""),
    "sliding_window_keeps_W": ("sliding layers keep W cached tokens instead of W - 1", """
import dgemma.kv_cache as kc
orig = kc.KVCache.__init__
def init(self, cfg, *a, **k):
    from dataclasses import replace
    orig(self, replace(cfg, sliding_window=cfg.sliding_window + 1), *a, **k)
    self.cfg = cfg
kc.KVCache.__init__ = init
"""),
    "attention_scale_rsqrt_d": ("attention scaled by 1/sqrt(d) instead of 1.0", """
import dgemma.model as m, dgemma.kv_cache as kc
orig = m.attention
def attention(q, k, v, mask):
    return orig(q * q.shape[-1] ** -0.5, k, v, mask)
m.attention = kc.attention = attention
"""),
    "no_self_conditioning_post_norm": ("decoder input post-norm skipped on the first step", """
import dgemma.model as m
orig = m.SelfConditioning.forward
m.SelfConditioning.forward = lambda self, e, soft: e if soft is None else orig(self, e, soft)
"""),
    "embed_scale_missing": ("token embeddings not scaled by sqrt(hidden)", """
import dgemma.model as m
m.DiffusionGemma.embed = lambda self, ids: self.embed_tokens(ids)
"""),
    "no_per_expert_scale": ("router per-expert scale ignored", """
import torch, dgemma.moe as moe
def fwd(self, residual):
    scores = self.proj(self.norm(residual) * self.scale * self.root)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, self.top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx
moe.Router.forward = fwd
"""),
    "commit_sampled_not_argmax": ("the sampled canvas is committed instead of the argmax canvas", """
import dgemma.engine as e
orig = e.Engine._commit
def commit(self, s, canvas):
    return orig(self, s, self.canvas[s.slot].tolist())
e.Engine._commit = commit
"""),
}


def run_one(name: str) -> dict:
    desc, src = MUTATIONS[name]
    code = src + "\nimport sys, pytest\nsys.exit(pytest.main(['-x', '-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))\n"
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *TESTS], cwd=ROOT, capture_output=True, text=True)
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return {"mutation": name, "description": desc, "caught": proc.returncode != 0,
            "first_failing_test": failed[0] if failed else None, "seconds": round(time.time() - t, 1)}


def main() -> None:
    names = sys.argv[1:] or list(MUTATIONS)
    rows = [run_one(n) for n in names]
    print(f"{'mutation':<32} {'caught':<7} first failing test")
    for r in rows:
        print(f"{r['mutation']:<32} {str(r['caught']):<7} {r['first_failing_test']}")
    (Path(__file__).parent / "mutation_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
