"""The memory plan (`dgemma.server.memory`, `dgemma plan`): the released 26B-A4B config against a hand count, the
CLI's JSON, the plan's KV term against a real engine's cache, and `dgemma serve` refusing with the numbers."""

from __future__ import annotations

import json

import pytest
import torch

from dgemma import plan as plan_cli
from dgemma.cli import main as dgemma_main
from dgemma.config import ModelConfig
from dgemma.server import memory
from helpers import make_tiny_checkpoint

RELEASED = "google/diffusiongemma-26B-A4B-it"
GiB = 2**30


@pytest.fixture(scope="module")
def released() -> ModelConfig:
    return plan_cli.find_config(RELEASED).config


@pytest.fixture(scope="module")
def released_params(released) -> int:
    return memory.count_parameters(released)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "tiny", canvas_length=16)


def hand_count_26b() -> int:
    """Parameters and buffers of the released text model, from the numbers of spec 1.2/1.3."""
    h, vocab, inter, experts, moe, layers = 2816, 262_144, 2112, 128, 704, 30
    total = 0
    for i in range(layers):
        full = (i + 1) % 6 == 0  # full attention at 5, 11, 17, 23, 29
        heads, kv, d = 16, (2 if full else 8), (512 if full else 256)
        total += h * heads * d + h * kv * d * (1 if full else 2) + heads * d * h  # q, k (and v), o; full: V = K
        total += 2 * d  # q_norm, k_norm (v_norm has no weight)
        total += 3 * h * inter  # dense MLP
        total += 7 * h  # input, post-attention, pre/post feed-forward (x2) and the final per-layer norm
        total += experts * (2 * moe * h + h * moe)  # gate_up, down
        total += experts * h + h + experts  # router proj, scale, per-expert scale
        total += 2  # layer_scalar, encoder_layer_scalar (buffers)
    total += vocab * h + h  # tied embedding, final norm
    total += 3 * h * inter + h  # self-conditioning MLP and norm
    total += 128 + 256 + 768  # RoPE buffers (inverse frequencies of both layer types, the signed table of both)
    return total


FULL_POSITION = 5 * 2 * 2 * 512 * 2  # one position in the 5 full layers: K and V, 2 heads x 512, bf16


def hand_kv_per_slot(canvas: int) -> int:
    """A slot's own KV: the sliding rings (window - 1 = 1023 positions) with their canvas head, in 25 layers, and
    the full layers' canvas scratch blocks (of 64 positions)."""
    sliding = 25 * 2 * (1023 + canvas) * 8 * 256 * 2
    return sliding + -(-canvas // 64) * 64 * FULL_POSITION


def test_released_plan_fits_80gib_at_262k_by_hand_count(released, released_params):
    assert released_params == hand_count_26b() == 25_250_987_964
    p = memory.plan(released, torch.bfloat16, device="cuda", max_num_seqs=1, max_model_len=262_144,
                    batch_invariant=False, cuda_graphs=True, params=released_params, available=80 * GiB,
                    extra=memory.vision_parts_from_config(released, torch.bfloat16))
    parts = dict(p.parts)
    assert parts["weights"] == 2 * hand_count_26b()
    assert parts["KV per slot (sliding rings, canvas scratch)"] == hand_kv_per_slot(256) == p.kv_bytes_per_slot
    # The pool: one full-length request's 4,096 blocks of 64 positions (and, for the flex block mask, 8 bytes per
    # block and decode row).
    assert p.num_kv_blocks == 4096 and parts["KV pool (full layers)"] == 4096 * (64 * FULL_POSITION + 8)
    # Fixed cost by hand: weights + one slot + the pool + the vision tower's weights; the rest is temporaries.
    fixed = 2 * hand_count_26b() + hand_kv_per_slot(256) + 4096 * 64 * FULL_POSITION + parts["vision tower weights"]
    assert fixed < p.total <= 0.9 * 80 * GiB
    # The old plan counted 3 x fp32 x 16 heads x 2048 x 262k attention scores (96 GiB): nothing like it remains.
    assert parts["attention workspace"] < 16 * GiB
    assert p.fits and p.requests_fit() == 1
    # Slots are cheap: 8 of them (the default) start, the pool taking the memory left (one full-length request
    # and then some); two full-length requests' pool does not fit.
    eight = memory.plan(released, torch.bfloat16, device="cuda", max_num_seqs=8, max_model_len=262_144,
                        batch_invariant=False, cuda_graphs=True, params=released_params, available=80 * GiB,
                        extra=memory.vision_parts_from_config(released, torch.bfloat16))
    assert eight.fits and eight.requests_fit() == 1 and eight.num_kv_blocks > 4096
    assert eight.requests_fit(8192) == 8 and eight.num_kv_blocks // 128 > 8
    two = memory.plan(released, torch.bfloat16, device="cuda", max_num_seqs=2, max_model_len=262_144,
                      batch_invariant=False, cuda_graphs=True, params=released_params, available=80 * GiB,
                      num_kv_blocks=2 * 4096, extra=memory.vision_parts_from_config(released, torch.bfloat16))
    assert not two.fits


def test_attention_workspace_is_linear_in_context(released):
    """No quadratic term: at a fixed prefill chunk the workspace grows linearly with the context length (to the
    rounding of the query pieces), and, one row attending at a time in both modes, not with the rows."""
    t = released.text
    w = [memory.encode_workspace(t, 2, 2048, n, 2, False) for n in (65_536, 131_072, 262_144)]
    assert 0 < w[1] - w[0] and abs((w[2] - w[1]) / (w[1] - w[0]) - 2) < 0.01
    assert memory.encode_workspace(t, 8, 2048, 262_144, 2, False) == memory.encode_workspace(t, 1, 2048, 262_144, 2,
                                                                                             True)


def test_plan_cli_json_for_the_released_config(capsys):
    rc = dgemma_main(["plan", RELEASED, "--max-model-len", "262144", "--max-num-seqs", "1", "--gpu-memory-gib", "80",
                      "--dtype", "bfloat16", "--canvas-length", "256", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True
    assert out["model"].endswith("assets/configs/diffusiongemma-26B-A4B-it/config.json")
    assert (out["mode"], out["dtype"], out["cuda_graphs"], out["canvas_length"]) == ("fast", "bfloat16", True, 256)
    assert sum(c["bytes"] for c in out["components"]) == out["total_bytes"] <= out["usable_bytes"]
    names = [c["name"] for c in out["components"]]
    for want in ("weights", "KV pool (full layers)", "KV per slot (sliding rings, canvas scratch)",
                 "attention workspace", "activations of one forward",
                 "CUDA-graph pool (estimate)", "vision tower weights"):
        assert want in names
    assert all(c["how"] for c in out["components"])
    assert out["usable_bytes"] == int(0.9 * 80 * GiB)
    assert out["full_length_requests_fit"] == 1
    short = out["requests_8k"]
    assert short["tokens"] == 8192
    pool = out["kv_pool"]
    assert (pool["block_size"], pool["num_blocks"], pool["blocks_per_full_length_request"]) == (64, 4096, 4096)
    assert short["in_pool"] == 4096 // 128 and short["fit"] == 1  # --max-num-seqs 1
    assert out["max_num_seqs_fit"] >= 8 and out["kv_backend"] == "flex"


def test_plan_cli_refuses_and_explains(ckpt, tmp_path, capsys):
    # A too-small budget: printed, exit status 1.
    assert dgemma_main(["plan", str(ckpt), "--max-model-len", "512", "--gpu-memory-gib", "0.001"]) == 1
    assert "fits: NO" in capsys.readouterr().out
    # A folder and its config.json give the same plan for a text-only checkpoint (the tiny vision stub aside).
    assert dgemma_main(["plan", str(ckpt), "--max-model-len", "512", "--gpu-memory-gib", "1", "--json"]) == 0
    folder = json.loads(capsys.readouterr().out)
    assert dgemma_main(["plan", str(ckpt / "config.json"), "--max-model-len", "512", "--gpu-memory-gib", "1",
                        "--json"]) == 0
    file = json.loads(capsys.readouterr().out)
    assert dict((c["name"], c["bytes"]) for c in folder["components"])["KV pool (full layers)"] == \
        dict((c["name"], c["bytes"]) for c in file["components"])["KV pool (full layers)"]
    # Bad input: exit 2 with a message.
    for argv, msg in ((["acme/not-cached"], "not in the local Hugging Face cache"),
                      ([str(tmp_path)], "no config.json"),
                      ([str(ckpt), "--max-num-seqs", "0"], "--max-num-seqs must be positive"),
                      ([str(ckpt), "--dtype", "auto"], "--dtype auto"),
                      ([str(ckpt), "--max-model-len", "999999"], "max_position_embeddings")):
        argv = ["plan", *argv] + (["--max-model-len", "512"] if "--max-model-len" not in argv else []) \
            + ["--gpu-memory-gib", "1"]
        assert dgemma_main(argv) == 2
        assert msg in capsys.readouterr().err


def test_plan_cli_reads_a_hub_id_from_the_local_cache_only(ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    snap = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((ckpt / "config.json").read_text())
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert dgemma_main(["plan", "acme/tiny", "--max-model-len", "512", "--gpu-memory-gib", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(snap / "config.json")


def test_plan_kv_term_is_what_the_engine_allocates(ckpt):
    from dgemma.llm import LLM

    llm = LLM(ckpt, max_num_seqs=3, max_model_len=300)
    cfg = ModelConfig.from_file(ckpt / "config.json")
    p = memory.plan(cfg, torch.float32, max_num_seqs=3, max_model_len=300, available=None)
    parts = dict(p.parts)
    assert parts["KV pool (full layers)"] + parts["KV per slot (sliding rings, canvas scratch)"] == \
        llm.engine.cache.nbytes()
    assert parts["KV per slot (sliding rings, canvas scratch)"] == 3 * p.kv_bytes_per_slot
    assert p.num_kv_blocks == llm.engine.pool.num_blocks == 3 * -(-300 // 64)
    # kv_usage: nothing held at rest; a finished request frees its slot again.
    assert memory.kv_usage(llm.engine.cache) == (0, llm.engine.cache.nbytes())


def test_serve_refuses_with_the_numbers_before_loading(ckpt, monkeypatch, capsys):
    import dgemma.checkpoint
    from dgemma.server import cli as serve_cli

    loads = []
    monkeypatch.setattr(dgemma.checkpoint, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * 2**20)  # a 16 MiB device
    assert serve_cli.main(["serve", str(ckpt), "--max-num-seqs", "2", "--max-model-len", "1024"]) == 2
    err = capsys.readouterr().err
    assert "not enough memory for --max-num-seqs 2 --max-model-len 1024" in err
    assert "GiB usable" in err and "KV pool" in err and "attention workspace" in err and "weights" in err
    assert "exact mode" in err  # the CPU's engine mode
    assert "would fit" in err or "does not fit" in err
    assert loads == []  # refused before any weight was read


def test_kv_usage_counts_committed_tokens(ckpt):
    from dgemma.llm import LLM
    from dgemma.sampling_params import SamplingParams

    llm = LLM(ckpt, max_num_seqs=2, max_model_len=300)
    eng, t = llm.engine, llm.engine.model.text
    eng.add_request(list(range(3, 43)), SamplingParams(max_new_tokens=16, max_denoising_steps=2, seed=0))
    eng.step()  # admitted, the 40-token prompt prefilled
    assert eng.cache.host_lengths[0] == 40
    hand = sum(2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * 4 * (min(40, t.sliding_window - 1)
                                                                     if t.is_sliding(i) else 40)
               for i in range(t.num_hidden_layers))
    assert memory.kv_usage(eng.cache) == (hand, eng.cache.nbytes())
    while eng.has_work():
        eng.step()
    assert memory.kv_usage(eng.cache)[0] == 0  # the finished request's slot holds nothing


def test_metrics_report_kv_cache_bytes(ckpt):
    import time

    import httpx

    from dgemma.server import ServerConfig
    from dgemma.server import cli as serve_cli
    from dgemma.server.metrics import parse_text

    llm, app = serve_cli.build(ServerConfig(model=str(ckpt), max_num_seqs=2, max_model_len=256))
    with serve_cli.BackgroundServer(app) as srv:
        deadline, values = time.monotonic() + 20, {}
        while time.monotonic() < deadline:
            values = parse_text(httpx.get(srv.url + "/metrics").text)
            if 'dgemma_kv_cache_bytes{state="free"}' in values:
                break
            time.sleep(0.05)
    assert values['dgemma_kv_cache_bytes{state="used"}'] == 0
    assert values['dgemma_kv_cache_bytes{state="free"}'] == llm.engine.cache.nbytes() > 0


def test_serve_and_plan_make_the_same_plan(ckpt, capsys):
    served = memory.check_checkpoint(ckpt, dtype="float32", device="cuda", max_num_seqs=2, max_model_len=512,
                                     canvas_length=None, max_waiting=64, available=GiB)
    assert (served.mode, served.fits) == ("fast", True)
    assert dgemma_main(["plan", str(ckpt), "--max-model-len", "512", "--max-num-seqs", "2", "--gpu-memory-gib", "1",
                        "--dtype", "float32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["bytes"]) for c in printed["components"]] == list(served.parts)
    exact = memory.check_checkpoint(ckpt, dtype="float32", device="cpu", max_num_seqs=2, max_model_len=512,
                                    canvas_length=None, max_waiting=64, available=GiB)
    assert exact.mode == "exact" and "queued and running prompts" in dict(exact.parts)


def test_plan_cli_counts_fp8_weights(capsys):
    """`--quantization fp8` plans the FP8 layout (fp8.weight_bytes): about half the bf16 weights, the rest equal."""
    from dgemma import fp8

    args = ["plan", "google/diffusiongemma-26B-A4B-it", "--max-model-len", "262144", "--max-num-seqs", "1",
            "--gpu-memory-gib", "80", "--dtype", "bfloat16", "--json"]
    plans = []
    for extra in ([], ["--quantization", "fp8"]):
        assert dgemma_main(args + extra) == 0
        plans.append(json.loads(capsys.readouterr().out))
    bf16, f8 = ({c["name"]: c["bytes"] for c in p["components"]} for p in plans)
    cfg = plan_cli.find_config("google/diffusiongemma-26B-A4B-it").config
    assert f8["weights"] == fp8.weight_bytes(cfg, torch.bfloat16, fp8.Fp8Scheme())
    assert 0.45 < f8["weights"] / bf16["weights"] < 0.55
    assert {k: v for k, v in f8.items() if k != "weights"} == {k: v for k, v in bf16.items() if k != "weights"}
    assert plans[1]["max_num_seqs_fit"] > plans[0]["max_num_seqs_fit"]


def test_metrics_report_kv_blocks_and_prefix_cache(ckpt):
    """Two requests with the same 150-token prompt: the second finds the two full 64-token blocks cached; /metrics
    shows the hits, the blocks (all free or cached once both are done) and no preemption."""
    import httpx

    from dgemma.server import ServerConfig
    from dgemma.server import cli as serve_cli
    from dgemma.server.metrics import parse_text

    llm, app = serve_cli.build(ServerConfig(model=str(ckpt), max_num_seqs=2, max_model_len=256))
    prompt = [(7 * i) % 200 + 5 for i in range(150)]
    with serve_cli.BackgroundServer(app) as srv:
        for seed in (1, 2):
            r = httpx.post(srv.url + "/v1/completions", json={"model": str(ckpt), "prompt": prompt, "max_tokens": 16,
                                                              "seed": seed}, timeout=60)
            assert r.status_code == 200, r.text
        values = parse_text(httpx.get(srv.url + "/metrics").text)
    assert values["dgemma_prefix_cache_queries_total"] == 300
    assert values["dgemma_prefix_cache_hits_total"] == 128
    assert values["dgemma_prefill_tokens_total"] == 150 + 150 - (128 - 7)  # one sliding layer of window 8
    assert values["dgemma_preemptions_total"] == 0
    blocks = {s: values[f'dgemma_kv_blocks{{state="{s}"}}'] for s in ("used", "cached", "free", "reserved")}
    assert blocks["used"] == blocks["reserved"] == 0 and blocks["cached"] == 2
    assert blocks["cached"] + blocks["free"] == llm.engine.pool.num_blocks


def test_server_refuses_a_request_larger_than_the_kv_pool(ckpt):
    """A pool of 2 blocks of 64 (--num-kv-blocks 2, memory check off): a request that could need 3 gets a 400 that
    says why, before it queues; one that fits is served."""
    import httpx

    from dgemma.server import ServerConfig
    from dgemma.server import cli as serve_cli

    llm, app = serve_cli.build(ServerConfig(model=str(ckpt), max_num_seqs=2, max_model_len=256, num_kv_blocks=2,
                                            check_memory=False))
    assert llm.engine.pool.num_blocks == 2
    with serve_cli.BackgroundServer(app) as srv:
        big = httpx.post(srv.url + "/v1/completions", json={"model": str(ckpt), "prompt": list(range(5, 155)),
                                                            "max_tokens": 16}, timeout=60)
        small = httpx.post(srv.url + "/v1/completions", json={"model": str(ckpt), "prompt": list(range(5, 15)),
                                                              "max_tokens": 16, "seed": 0}, timeout=60)
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    assert "needs 3 KV blocks" in big.json()["error"]["message"]
    assert small.status_code == 200
