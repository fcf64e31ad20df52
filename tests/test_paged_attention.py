"""The fast decode's two ways of reading the paged pool in the full layers (docs/kv_cache.md): GATHER (one copy of
each row's blocks per layer) and FLEX (FlexAttention over the whole pool with a BlockMask built from the block
table: no copy). On the CPU, eager flex is the unfused math fallback; it must agree with gather, give the same
tokens in the engine, and compile as one graph with the rest of the step."""

import pytest
import torch
from helpers import GEN_CANVAS, GEN_KNOBS, generation_models

from dgemma.engine import Engine, EngineConfig
from dgemma.kv_cache import CanvasSegment, EncodeSegment, KVCache
from dgemma.sampling_params import SamplingParams

pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
C = GEN_CANVAS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return generation_models(tmp_path_factory, "paged")[1]


@torch.no_grad()
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_flex_reads_the_same_keys_as_gather(model, block_size):
    """Rows of different lengths (one shorter than a block), their blocks scattered over the pool in random order:
    the decode's hidden states agree between the two backends."""
    g = torch.Generator().manual_seed(0)
    v = model.text.vocab_size
    cache = KVCache(model.text, 3, 64, scratch=C, block_size=block_size, num_blocks=40)
    lengths = [13, 30, 1]
    prompts = [torch.randint(0, v, (n,), generator=g) for n in lengths]
    free = torch.randperm(40, generator=g).tolist()
    for slot, p in enumerate(prompts):
        cache.set_blocks(slot, [free.pop() for _ in range(-(-len(p) // block_size))])
        seg = EncodeSegment(cache, p[None], [slot])
        model([seg])
        seg.finish()
    canvas = torch.randint(0, v, (3, C), generator=g)
    model.fuse_projections()
    key_lens = {size: 64 + C for size in set(cache.kept_size)}
    out = {}
    for backend in ("gather", "flex"):
        seg = CanvasSegment(cache, canvas, cache.dev_lengths[:3], None, key_lens, model.dtype, backend)
        out[backend] = model([seg])[0]
    assert (out["gather"] - out["flex"]).abs().max() <= 1e-5 * out["gather"].abs().max()


def run(model, backend, compiled=False, seeds=(3, 4, 5)):
    prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41, 42, 43, 44, 45]]
    eng = Engine(model, eos_token_ids=[95], config=EngineConfig(
        max_num_seqs=4, max_model_len=128, batch_invariant=False, block_size=4, kv_backend=backend,
        compile=compiled))
    if compiled:
        torch._dynamo.reset()
        eng._compiled = torch.compile(eng._fast_step, fullgraph=True, backend="aot_eager", dynamic=False)
    params = [SamplingParams(max_new_tokens=2 * C, seed=s, entropy_bound=0.1, **GEN_KNOBS) for s in seeds]
    return [o.token_ids for o in eng.run(list(zip(prompts, params)))]


def test_engine_tokens_same_with_flex_and_gather(model):
    assert run(model, "flex") == run(model, "gather")


def test_flex_step_compiles_as_one_graph(model):
    assert run(model, "flex", compiled=True, seeds=(7, 8, 9)) == run(model, "gather", seeds=(7, 8, 9))


def test_context_shorter_than_the_window(model):
    """max_model_len below the sliding window: sliding and full layers keep the same number of positions, and the
    fast decode must still tell them apart (it keyed its plan by that number alone, and read a sliding layer as a
    paged one)."""
    from dgemma.op_count import build_tiny_model

    tiny = build_tiny_model(layers=6, vocab=512, canvas=16)  # window 1,024 > max_model_len 96
    out = {}
    for backend in ("gather", "flex"):
        eng = Engine(tiny, eos_token_ids=[], config=EngineConfig(max_num_seqs=2, max_model_len=96, block_size=16,
                                                                 batch_invariant=False, kv_backend=backend))
        assert eng.cache.kept_size[0] == eng.cache.kept_size[5] == 96 and eng.cache.sliding[0]
        params = SamplingParams(max_new_tokens=32, seed=1, ignore_eos=True, max_denoising_steps=4)
        out[backend] = [o.token_ids for o in eng.run([(list(range(3, 40)), params), (list(range(7, 20)), params)])]
    assert out["gather"] == out["flex"] and all(len(t) == 32 for t in out["gather"])


def test_model_without_full_layers_has_an_empty_pool():
    """Sliding layers only: nothing is paged; both backends run (flex has no full layer to build a mask for)."""
    from helpers import tiny_text_config

    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma

    text = tiny_text_config(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    m = DiffusionGemma(ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": C,
                                              "text_config": text, "eos_token_id": [95]}))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    m.eval()
    out = {}
    for backend in ("gather", "flex"):
        eng = Engine(m, eos_token_ids=[], config=EngineConfig(max_num_seqs=2, max_model_len=64, block_size=4,
                                                              batch_invariant=False, kv_backend=backend))
        assert not eng.cache.kv
        params = SamplingParams(max_new_tokens=2 * C, seed=3, ignore_eos=True, max_denoising_steps=4)
        out[backend] = eng.run([(list(range(3, 20)), params)])[0].token_ids
    assert out["gather"] == out["flex"] and len(out["gather"]) == 2 * C
