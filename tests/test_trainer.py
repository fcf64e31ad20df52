"""The trainer: it learns, resumes exactly after a kill, accumulates gradients faithfully, fine-tunes with LoRA,
exports a checkpoint that dgemma and transformers load, and runs from the command line on a text corpus."""

import json
import math

import pytest
import torch
from helpers import tiny_text_config
from test_train_objective import tiny_model

from dgemma import checkpoint
from dgemma.train import LoRAConfig, TextCorpusSource, TrainConfig, Trainer, merge_lora, unmerge_lora
from dgemma.train.cli import main as train_main
from dgemma.train.data import collate
from dgemma.train.objective import run

OVERFIT = [([2, 10 + i, 20 + i], [30 + i, 40 + i, 50 + i, 60 + i, 70 + i]) for i in range(4)]


def random_source(index):
    g = torch.Generator().manual_seed(1000 + index)
    p, r = int(torch.randint(1, 12, (), generator=g)), int(torch.randint(1, 20, (), generator=g))
    return torch.randint(3, 96, (p,), generator=g).tolist(), torch.randint(3, 96, (r,), generator=g).tolist()


def fresh(seed=0):
    return tiny_model(canvas_length=8, seed=seed).train()


def cfg(**kw):
    base = {"steps": 6, "batch_size": 2, "lr": 3e-3, "warmup": 2, "progress": False}
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_model_denoises_a_tiny_task(tmp_path):
    model = tiny_model(canvas_length=8)
    model.init_weights(generator=torch.Generator().manual_seed(0))  # plain from-scratch init
    tr = Trainer(model, lambda i: OVERFIT[i % 4], cfg(steps=100, batch_size=4, warmup=5, weight_decay=0.0), tmp_path)
    recs = tr.train()
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    assert recs[-1]["lr"] < 1e-4 and recs[4]["lr"] == pytest.approx(3e-3)  # warm-up then cosine to zero
    # one denoising step from pure noise already recovers most of the memorised responses (chance: 1/96)
    b = collate(OVERFIT, range(4), 8, 1)
    noise = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, hd = run(model.eval(), b.input_ids, b.lengths, noise, b.prompt_lens)
    assert (model.logits(hd).argmax(-1) == b.input_ids[:, 3:11]).float().mean() > 0.5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 101))
    assert {"loss", "decoder_loss", "encoder_loss", "lr", "grad_norm", "examples_per_s"} <= set(lines[0])


class Kill(Exception):
    pass


def kill_at(step):
    def hook(trainer, rec):
        if rec["step"] == step:
            raise Kill()
    return hook


def metric_lines(path):
    return [{k: v for k, v in json.loads(x).items() if k not in ("examples_per_s", "wall_s")}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4)])
def test_killed_run_resumes_exactly(tmp_path, lora):
    c = cfg(steps=6, save_every=3, grad_accum=2)
    straight = Trainer(fresh(), random_source, c, tmp_path / "a", lora=lora)
    straight.train()
    killed = Trainer(fresh(), random_source, c, tmp_path / "b", lora=lora, on_step=kill_at(5))
    with pytest.raises(Kill):
        killed.train()
    assert killed.step == 5 and (tmp_path / "b/checkpoints/LATEST").read_text() == "step-00000003"
    # a new process: differently initialised weights, which the checkpoint must overwrite
    resumed = Trainer(fresh(seed=7) if lora is None else fresh(), random_source, c, tmp_path / "b", lora=lora)
    assert (resumed.step, resumed.position) == (3, 12)
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert metric_lines(tmp_path / "a") == metric_lines(tmp_path / "b")
    for a, b in zip(straight.params, resumed.params):
        sa, sb = straight.optimizer.state[a], resumed.optimizer.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ck = tmp_path / "b/checkpoints/step-00000006"
    files = {p.suffix for p in ck.rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json"}, files  # no pickles
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]


def assert_same_gradients(a_params, b_params, rel=1e-4):
    for a, b in zip(a_params, b_params):
        assert (a.grad - b.grad).abs().max() <= rel * a.grad.abs().max() + 1e-9


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    """Same examples, same noise, same normalisation: the gradient of a step is the big batch's, up to float
    summation order. (Weights are compared only loosely: Adam's first steps move every weight by about lr, whatever
    the size of its gradient, so roundoff in a near-zero gradient can flip a step's sign.)"""
    big = Trainer(fresh(), random_source, cfg(steps=3, batch_size=4), tmp_path / "a")
    accum = Trainer(fresh(), random_source, cfg(steps=3, batch_size=2, grad_accum=2), tmp_path / "b")
    for step in range(2):
        x, y = big.train_step(), accum.train_step()
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["examples"] == y["examples"] == 4 * big.step
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        if step == 0:  # from identical weights
            assert_same_gradients(big.params, accum.params)
    for a, b in zip(big.model.parameters(), accum.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2 * 2 * 3e-3)


def test_export_loads_in_dgemma_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tr = Trainer(fresh(), random_source, cfg(steps=2), tmp_path)
    tr.train()
    path = tr.export()
    back = checkpoint.load(path).model
    for name, t in tr.model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path).state_dict()
    assert torch.equal(hf["model.decoder.embed_tokens.weight"], tr.model.embed_tokens.weight)
    layers = tr.model.layers
    assert torch.equal(hf["model.decoder.layers.1.self_attn.q_proj.weight"], layers[1].self_attn.q_proj.weight)
    assert torch.equal(hf["model.encoder.language_model.layers.2.layer_scalar"], layers[2].encoder_layer_scalar)
    assert torch.equal(hf["model.decoder.self_conditioning.gate_proj.weight"],
                       tr.model.self_conditioning.gate_proj.weight)


def test_lora_trains_adapters_only_and_merges_on_export(tmp_path):
    base = fresh()
    checkpoint.save(base, tmp_path / "base")
    loaded = checkpoint.load(tmp_path / "base").model  # fine-tuning starts from a loaded checkpoint
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    before_types = dict(loaded.named_modules())
    tr = Trainer(loaded, random_source, cfg(steps=3, lr=1e-2), tmp_path / "run", lora=LoRAConfig(rank=4, alpha=8))
    tr.train()
    names = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert any("self_attn.q_proj" in n for n in names) and not any("router" in n for n in names)
    for k, v in before.items():  # base weights untouched (the wrapped ones keep their names)
        assert torch.equal(tr.model.state_dict()[k], v), k
    swaps = merge_lora(tr.model)  # merged modules keep the model's own linear class (batch-invariant mode)
    assert type(tr.model.layers[0].self_attn.q_proj) is type(before_types["layers.0.self_attn.q_proj"])
    unmerge_lora(swaps)
    merged = checkpoint.load(tr.export()).model
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight, before["layers.0.self_attn.q_proj.weight"])
    b = collate([random_source(i) for i in range(3)], range(3), 8, 1)
    canvas = torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, ha = run(tr.model.eval(), b.input_ids, b.lengths, canvas, b.prompt_lens)
        _, hb = run(merged, b.input_ids, b.lengths, canvas, b.prompt_lens)
    torch.testing.assert_close(merged.logits(hb), tr.model.logits(ha), rtol=1e-4, atol=1e-4)
    assert sum(1 for _ in tr.model.modules() if type(_).__name__ == "LoRALinear") > 0  # export left LoRA in place


def test_train_config_validates_and_schedules():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(steps=1, batch_size=0)
    with pytest.raises(ValueError):
        TrainConfig(steps=1, lr=-1.0)
    c = TrainConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert [c.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert c.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert c.lr_at(110) == pytest.approx(0.1)


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [3 + ord(ch) % 90 for ch in text]


def test_text_corpus_source_windows():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    src = TextCorpusSource(text, CharTokenizer(), seed=4, window=32, min_prompt=4, min_response=8, bos_id=2)
    ids = CharTokenizer().encode(text)
    for i in range(20):
        p, r = src.example(i)
        assert p[0] == 2 and len(p) - 1 >= 4 and len(r) >= 8 and len(p) - 1 + len(r) == 32
        joined = p[1:] + r
        assert any(ids[s:s + 32] == joined for s in range(len(ids) - 31))
    assert src.example(5) == src.example(5) and src.example(5) != src.example(6)


def test_cli_trains_on_a_text_file_and_resumes(tmp_path, capsys):
    from dgemma.tokenizer_train import save_tokenizer_dir, train_bpe_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A diffusion model denoises a canvas of tokens, block by block. " * 40)
    tok = save_tokenizer_dir(train_bpe_tokenizer([corpus], vocab_size=300), tmp_path / "tok")
    config = {"model_type": "diffusion_gemma", "canvas_length": 8, "text_config": tiny_text_config(vocab_size=320)}
    args = ["--config", json.dumps(config), "--data", f"text:{corpus}", "--tokenizer", str(tok), "--out",
            str(tmp_path / "run"), "--batch_size", "2", "--save-every", "2", "--data-arg", "window=24",
            "--no-progress", "--lr", "1e-3", "--log-every", "1"]
    assert train_main(args + ["--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert (tmp_path / "run/final/tokenizer.json").is_file()
    assert train_main(args + ["--steps", "4"]) == 0  # continues from step 3
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    final = checkpoint.load(tmp_path / "run/final")
    assert final.config.canvas_length == 8 and final.config.text.vocab_size == 320


def test_sources_are_pluggable():
    from dgemma.train import ChunkedSource, make_source, register_source

    def make_chunk(rng, n):  # a bulk generator, as the Sudoku maker is
        return [([2], rng.integers(3, 96, 4).tolist()) for _ in range(n)]

    register_source("toy", lambda arg, seed, tokenizer=None, **kw: ChunkedSource(make_chunk, seed, int(arg)))
    src = make_source("toy:5", seed=1)
    seq = [src.example(i) for i in range(12)]
    assert [src.example(i) for i in (11, 3, 7)] == [seq[11], seq[3], seq[7]]  # random access, no replay
    assert make_source("toy:5", seed=2).example(0) != seq[0]
    with pytest.raises(ValueError, match="unknown data source"):
        make_source("nope:x")
    tr = Trainer(fresh(), lambda i: seq[i % 12], cfg(steps=1, save_every=0), "unused-never-written", resume=False)
    assert tr.source.example(13) == seq[1]  # a plain callable is a source too
