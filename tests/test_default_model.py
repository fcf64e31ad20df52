"""The embedded default model (dgemma/assets/shakespeare/): a real trained DiffusionGemma that loads in dgemma and in
transformers with the same weights and logits, and whose default generation is English-like Shakespeare text."""

import json
import re
from pathlib import Path

import pytest
import torch

from dgemma import LLM, SamplingParams, checkpoint
from dgemma.config import FULL, SLIDING
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache
from dgemma.llm import default_model_path

ROOT = Path(__file__).resolve().parents[1]
ASSET_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja"}
# The most frequent words of the corpus (and of English plays generally).
COMMON = set("""the and i to of a you my that in is not me it with be your his this he for but have thou so as
will thy what her him all shall by no do we our are if on or o lord good now sir king thee then from let well
more was they here than must which their them there how would she am when upon at an one come make love yet""".split())


HELDOUT_NLL_MAX = 4.5  # the shipped model: 3.68 on this slice; at step 100 of training 5.42; random weights 7.66


@pytest.fixture(scope="module")
def llm():
    return LLM()  # no argument: the embedded model


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def test_asset_is_complete_small_and_the_documented_architecture():
    path = default_model_path()
    assert path == ROOT / "dgemma" / "assets" / "shakespeare"
    assert ASSET_FILES <= {f.name for f in path.iterdir()}
    assert sum(f.stat().st_size for f in path.iterdir()) <= 30 * 2**20
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["model_type"] == "diffusion_gemma" and cfg["canvas_length"] >= 64
    assert text["num_experts"] >= 4 and 1 < text["top_k_experts"] < text["num_experts"]  # a real MoE
    assert {SLIDING, FULL} <= set(text["layer_types"]) and text["layer_types"][-1] == FULL
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["sampler_config"]["_cls_name"] == "EntropyBoundSamplerConfig"
    assert 2e6 <= checkpoint.load(path).model.config.text.num_parameters() <= 6e6


@torch.no_grad()
def test_transformers_loads_the_same_weights_and_logits():
    transformers = pytest.importorskip("transformers")
    from transformers import DynamicCache

    path = default_model_path()
    model = checkpoint.load(path, dtype=torch.float32).model.eval()
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    hf_sd = hf.state_dict()
    for name, t in model.state_dict().items():
        if "inv_freq" in name:
            continue
        assert torch.equal(hf_sd[checkpoint.to_checkpoint_name(name)], t), name

    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    prompt = torch.tensor([tok.encode("ROMEO:\nWhat light through yonder window breaks?\n")])
    c = model.config.canvas_length
    canvas = torch.tensor([tok.encode(" It is the east, and Juliet is the sun." * 8, add_special_tokens=False)[:c]])
    cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    ref = hf(decoder_input_ids=canvas, past_key_values=cache).logits
    kv = KVCache(model.text, num_slots=1, capacity=prompt.shape[1] + c)
    seg = EncodeSegment(kv, prompt, slots=[0])
    model([seg])
    seg.finish()
    (hidden,) = model([DecodeSegment(kv, canvas, slots=[0])])
    mine = model.logits(hidden)
    assert ((mine - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    # A trained denoiser: a clean canvas is mostly reproduced (a random model gets ~0 of 64).
    assert (mine.argmax(-1) == canvas).float().mean().item() >= 0.5


@torch.no_grad()
def test_heldout_next_token_loss_is_that_of_a_trained_model(llm):
    """The encoder's next-token NLL on the held-out end of the corpus (the recipe never trained on it): a trained
    model, far below the uniform ln(2048) = 7.6 nats of an untrained one (docs/shakespeare_model.md)."""
    from dgemma.train.objective import EncoderSegment

    lines = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    heldout = "".join(lines[int(len(lines) * 0.95):])  # inside the recipe's held-out 10%
    ids = llm.tokenizer.encode(heldout, add_special_tokens=False)
    x = torch.tensor([[llm.tokenizer.bos_token_id] + ids[i:i + 135] for i in range(0, 16 * 135, 135)])
    model = llm.model
    (h,) = model([EncoderSegment(x, torch.full((x.shape[0],), x.shape[1]), model.text)])
    nll = torch.nn.functional.cross_entropy(model.logits(h[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
    assert nll.item() <= HELDOUT_NLL_MAX, nll.item()


def test_default_generation_is_english_like_shakespeare(llm):
    """Real outcomes at the shipped defaults. Thresholds sit between this model (real words ~0.72, corpus bigrams
    ~0.2-0.35, common words ~0.4, ~6 tokens per forward) and the same architecture with random weights (real words
    ~0.4, bigrams <= 0.02, common words <= 0.09, 2 tokens per forward: every canvas runs to the step cap)."""
    corpus = _words((ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    known, bigrams = set(corpus), set(zip(corpus, corpus[1:]))
    gen = llm.generation
    for prompt, seed in (("ROMEO:", 0), ("To be, or not to be", 1), ("KING HENRY VI:\nWhat", 2)):
        out = llm.generate(prompt, SamplingParams(seed=seed))[0]
        text = out.text
        assert len(out.token_ids) == gen.max_new_tokens >= 2 * llm.config.canvas_length, (prompt, text)
        assert len(text) >= 150, text
        assert sum(ch.isprintable() or ch == "\n" for ch in text) / len(text) >= 0.99, text
        words = _words(text)
        assert len(words) >= 30, text
        assert sum(w in known for w in words) / len(words) >= 0.6, text  # mostly real words
        pairs = list(zip(words, words[1:]))
        assert sum(p in bigrams for p in pairs) / len(pairs) >= 0.1, text  # that follow each other as in the plays
        assert sum(w in COMMON for w in words) / len(words) >= 0.25, text  # English function words
        assert re.search(r"^[A-Z][A-Za-z ]+:$", prompt + text, re.M), text  # the play format: "SPEAKER:" lines
        # Block diffusion at the shipped defaults: several tokens per decoder forward, within the step cap.
        assert out.tokens_per_forward >= 3.0, out.steps_per_canvas
        assert all(1 <= s < gen.max_denoising_steps for s in out.steps_per_canvas), out.steps_per_canvas


def test_cli_generate_uses_the_default_model(capsys):
    from dgemma.cli import main

    assert main(["generate", "ROMEO:", "--json", "--seed", "0", "--max-new-tokens", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion_tokens"] == 64 and out["tokens_per_forward"] > 1.0
    assert len(_words(out["text"])) >= 8
