"""Tensor parallelism on this CPU: two gloo ranks against one process (docs/parallel.md).

- the decoder's fp32 logits, and the sampler's self-conditioning signal (a vocabulary-parallel product), match one
  process within 1e-5, over several inputs, in both engine modes; each rank loads only its slices;
- `LLM(tensor_parallel_size=2)` generates the same tokens as one process (the parity model's low self-conditioning
  gain), in both engine modes, and counts the bytes its collectives moved;
- a rank that dies, or one that stops answering, gives a clear error on the other ranks within seconds (the
  collective timeout), never a hang; the plan gives one rank's memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import GEN_CANVAS, GEN_KNOBS, make_hf_model
from safetensors.torch import load_file, save_file

from dgemma import checkpoint, parallel, sampler
from dgemma.batch_invariant import mode
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache
from dgemma.engine import EngineConfig
from dgemma.llm import LLM
from dgemma.parallel import CollectiveError, ParallelConfig
from dgemma.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """The generation parity model (canvas 8, self-conditioning gain 0.1): 4 query heads, 2 sliding KV heads and
    1 full-layer KV head (replicated on both ranks), 4 experts."""
    path = tmp_path_factory.mktemp("tp-ck")
    make_hf_model(canvas_length=GEN_CANVAS, seed=5, sc_gain=0.1).save_pretrained(path)
    return path


def forward(model, seed: int, exact: bool) -> dict[str, torch.Tensor]:
    """Prefill two prompts, then decode two canvases with a self-conditioning input: logits and the next signal."""
    g = torch.Generator().manual_seed(seed)
    V, C, H = model.text.vocab_size, model.config.canvas_length, model.text.hidden_size
    cache = KVCache(model.cache_config, 2, 64)
    with torch.no_grad(), mode(exact, C):
        ids = torch.randint(0, V, (2, 11), generator=g)
        enc = EncodeSegment(cache, ids, [0, 1], [11, 7])
        model([enc])
        enc.finish()
        canvas = torch.randint(0, V, (2, C), generator=g)
        sc = torch.randn(2, C, H, generator=g)
        hidden = model([DecodeSegment(cache, canvas, [0, 1], sc)])[0]
        logits = model.logits(hidden)
        signal_ = sampler.self_conditioning_embeddings(logits / 0.7, model.embed_tokens.weight,
                                                       model.text.embed_scale)
    return {f"logits.{seed}": logits, f"sc.{seed}": signal_}


def _rank(rank: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    tp = parallel.init(ParallelConfig(2, timeout_s=30), rank, "cpu", f"tcp://127.0.0.1:{port}")
    try:
        model = checkpoint.load(path, tp=tp).model
        res = {f"param.{n}": p.detach().clone() for n, p in model.state_dict().items()}
        for exact in (True, False):
            for seed in SEEDS:
                res.update({f"{k}.{exact}": v for k, v in forward(model, seed, exact).items()})
        save_file(res, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        tp.close()


@pytest.fixture(scope="module")
def ranks(ck, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-out")
    mp.spawn(_rank, args=(parallel.free_port(), str(ck), str(out)), nprocs=2, join=True)
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]


def test_two_ranks_give_the_logits_and_self_conditioning_of_one_process(ck, ranks):
    model = checkpoint.load(ck).model
    worst = 0.0
    for exact in (True, False):
        for seed in SEEDS:
            ref = forward(model, seed, exact)
            for k, v in ref.items():
                for r in range(2):  # every rank holds the full result (gathered / all-reduced)
                    got = ranks[r][f"{k}.{exact}"]
                    assert got.shape == v.shape
                    worst = max(worst, float((got - v).abs().max()))
    assert worst <= 1e-5, worst


def test_each_rank_loads_only_its_slices(ck, ranks):
    full = checkpoint.load(ck).model
    state = full.state_dict()
    V, H = full.text.vocab_size, full.text.hidden_size
    for r in range(2):
        got = {k[len("param."):]: v for k, v in ranks[r].items() if k.startswith("param.")}
        assert got["embed_tokens.weight"].shape == (V // 2, H)
        # rank r's query heads are rows [r * 2 * d, (r + 1) * 2 * d) of q_proj; its full-layer KV head is the one
        # KV head (replicated); its experts' gate rows and up rows are its halves of each.
        d = full.text.head_dim
        assert torch.equal(got["layers.0.self_attn.q_proj.weight"],
                           state["layers.0.self_attn.q_proj.weight"][r * 2 * d:(r + 1) * 2 * d])
        assert torch.equal(got["layers.2.self_attn.k_proj.weight"], state["layers.2.self_attn.k_proj.weight"])
        m = full.text.moe_intermediate_size
        gu = state["layers.1.experts.gate_up_proj"]
        half = slice(r * m // 2, (r + 1) * m // 2)
        assert torch.equal(got["layers.1.experts.gate_up_proj"],
                           torch.cat([gu[:, half], gu[:, m:][:, half]], 1))
        assert torch.equal(got["layers.1.experts.down_proj"], state["layers.1.experts.down_proj"][:, :, half])
        assert torch.equal(got["layers.3.router.proj.weight"], state["layers.3.router.proj.weight"])
    counted = sum(v.numel() for k, v in ranks[0].items() if k.startswith("param.") and ".vision." not in "." + k[6:])
    rope = sum(b.numel() for n, b in full.named_buffers() if "inv_freq" in n)  # not saved; the plan counts them
    assert counted + rope == parallel.rank_parameters(full.config, 2)


def run(llm: LLM, seeds) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=3 * GEN_CANVAS, seed=s, entropy_bound=0.1, **GEN_KNOBS) for s in seeds]
    return [o.token_ids for o in llm.generate([[5, 17, 33, 2, 9, 41, 60], [7, 3, 11]], params)]


@pytest.mark.parametrize("exact,ep", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["exact", "fast", "exact-ep", "fast-ep"])
def test_generation_with_two_ranks_gives_the_tokens_of_one(ck, exact, ep):
    """Tensor-parallel experts (each split in two), and expert parallel (`ep`: two whole experts per rank)."""
    one = run(LLM(ck, max_model_len=128, batch_invariant=exact), (11, 12))
    llm = LLM(ck, max_model_len=128, batch_invariant=exact, tensor_parallel_size=2, tp_timeout_s=30,
              enable_expert_parallel=ep)
    experts = llm.model.layers[0].experts
    E, M = llm.config.text.num_experts, llm.config.text.moe_intermediate_size
    assert experts.gate_up_proj.shape[:2] == ((E // 2, 2 * M) if ep else (E, M))
    workers = llm.tp.workers
    try:
        two = run(llm, (11, 12))
        stats = llm.tp.stats
        assert two == one
        assert sum(map(len, two)) > GEN_CANVAS
        # every forward: one all-reduce per block half and the embedding's; the logits gathered for the sampler
        layers = llm.config.text.num_hidden_layers
        assert stats.calls["all_reduce"] >= llm.engine.stats["forwards"] * (2 * layers + 1)
        assert stats.calls["all_gather"] > 0 and stats.bytes["all_gather"] > 0
    finally:
        llm.close()
    for p in workers:
        p.join(10)
        assert p.exitcode == 0


def test_a_rank_that_dies_gives_a_clear_error_not_a_hang(ck):
    llm = LLM(ck, max_model_len=128, tensor_parallel_size=2, tp_timeout_s=20)
    worker = llm.tp.workers[0]
    try:
        run(llm, (1, 2))  # the group works
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        t0 = time.monotonic()
        with pytest.raises(CollectiveError, match="rank died or did not answer"):
            run(llm, (3, 4))
        assert time.monotonic() - t0 < 10  # the dead peer's closed connection is seen at once
    finally:
        llm.close()


def test_a_rank_that_stops_answering_times_out(ck):
    llm = LLM(ck, max_model_len=128, tensor_parallel_size=2, tp_timeout_s=3)
    worker = llm.tp.workers[0]
    try:
        run(llm, (1, 2))
        os.kill(worker.pid, signal.SIGSTOP)  # alive but stuck: only the timeout can tell
        t0 = time.monotonic()
        with pytest.raises(CollectiveError):
            run(llm, (3, 4))
        assert time.monotonic() - t0 < 15
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        llm.close()
        worker.join(10)
    assert not worker.is_alive()


LEADER = textwrap.dedent("""
    import os, sys, time
    from dgemma.llm import LLM
    from dgemma.sampling_params import SamplingParams
    if __name__ == "__main__":
        llm = LLM(sys.argv[1], max_model_len=128, tensor_parallel_size=2, tp_timeout_s=30)
        llm.generate([[5, 17, 33]], SamplingParams(max_new_tokens=8, seed=0))
        print(llm.tp.workers[0].pid, flush=True)
        os._exit(3)  # the leader dies without closing the group
""")


def test_followers_exit_when_the_leader_dies(ck, tmp_path):
    script = tmp_path / "leader.py"
    script.write_text(LEADER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), str(ck)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 3, out.stderr
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the follower outlived its leader"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_plan_gives_one_ranks_memory():
    from dgemma.plan import PlanRequest, find_config, make_plan

    target = find_config("google/diffusiongemma-26B-A4B-it")
    plans = {n: make_plan(target, PlanRequest(32768, 1, 80, torch.bfloat16, tensor_parallel_size=n,
                                              num_kv_blocks=512)) for n in (1, 2)}  # one 32k request's pool
    parts = {n: {c["name"]: c["bytes"] for c in p["components"]} for n, p in plans.items()}
    assert parts[2]["weights"] == parallel.rank_parameters(target.config, 2) * 2
    assert parts[1]["weights"] / 2 < parts[2]["weights"] < parts[1]["weights"] / 2 * 1.01  # replicated: norms etc.
    # sliding layers split their 8 KV heads; the full layers' 2 KV heads split too at N = 2
    for kv in ("KV pool (full layers)", "KV per slot (sliding rings, canvas scratch)"):
        assert 0 <= parts[2][kv] * 2 - parts[1][kv] <= 512 * 8, kv  # K/V halve; the block tables do not split
    assert plans[2]["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide"):
        parallel.rank_parameters(target.config, 3)


def test_a_size_that_does_not_divide_the_model_is_refused_before_any_process_starts(ck):
    import multiprocessing

    before = len(multiprocessing.active_children())
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide this model: num_attention_heads 4"):
        LLM(ck, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="FP8"):
        LLM(ck, tensor_parallel_size=2, quantization="fp8")
    assert len(multiprocessing.active_children()) == before


def test_the_step_plan_travels_as_json_and_safetensors_not_pickle():
    """Every command the leader sends (requests with a schema, a choice, stops and seeds, its images, the engine
    defaults; an abort; stop) comes back equal from bytes that are JSON (image tensors inside as safetensors)."""
    import json

    from dgemma.config import GenerationConfig
    from dgemma.parallel_engine import decode_plan, encode_plan
    from dgemma.vision_prompt import PromptImages

    params = SamplingParams(seed=7, stop=("\n\n",), stop_token_ids=(3,), top_k=5, max_new_tokens=9)
    choice = SamplingParams(seed=2, choice=("yes", "no"))
    schema = SamplingParams(seed=1, json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    images = PromptImages(pixel_values=torch.randn(1, 4, 12), positions=torch.arange(8).view(1, 4, 2),
                          token_index=torch.tensor([2, 3]), blocks=torch.tensor([-1, -1, 0, 0]), counts=[2],
                          digests=["ab"])
    defaults = GenerationConfig(max_denoising_steps=7, eos_token_ids=(1, 2))
    plan = [("add", [5, 6, 7, 8], params, "req-1", images, defaults), ("add", [5], schema, "req-2", None, None),
            ("add", [4], choice, "req-3", None, None),
            ("abort", "req-1"), ("stop",)]
    data = encode_plan(plan)
    json.loads(data)  # plain JSON
    back = decode_plan(data)
    assert back[0][:4] == ("add", [5, 6, 7, 8], params, "req-1") and back[0][5] == defaults
    got = back[0][4]
    for name in ("pixel_values", "positions", "token_index", "blocks"):
        assert torch.equal(getattr(got, name), getattr(images, name)), name
    assert got.counts == [2] and got.digests == ["ab"] and got.embeds is None
    assert back[1] == ("add", [5], schema, "req-2", None, None) and back[2] == ("add", [4], choice, "req-3", None, None)
    assert back[3:] == [("abort", "req-1"), ("stop",)]


def test_a_request_the_leader_fails_is_dropped_by_the_followers_too(ck):
    """`LeaderEngine.fail` (the server's fallback when an abort fails) sends an abort in the next step's plan, so a
    follower's slots stay those of the leader."""
    from types import SimpleNamespace

    from dgemma.outputs import Failure
    from dgemma.parallel_engine import LeaderEngine, decode_plan

    sent = []
    llm = LLM(ck, max_num_seqs=2, max_model_len=64)
    tp = SimpleNamespace(broadcast_plan=lambda data: sent.append(decode_plan(data)))
    eng = LeaderEngine(llm.model, eos_token_ids=[1], tokenizer=None, tp=tp,
                       config=EngineConfig(max_num_seqs=2, max_model_len=64))
    rid = eng.add_request([5, 6, 7], SamplingParams(seed=1, max_new_tokens=16))
    eng.step()
    assert [c[0] for c in sent[0]] == ["add"]
    assert eng.fail(rid, Failure("internal", "test")) is not None
    eng.step()
    assert sent[1] == [("abort", rid)] and eng.num_running == 0
