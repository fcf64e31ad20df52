"""The Shakespeare recipe's helpers: the autoregressive baseline, held-out evaluation, export and sampling.

    # the AR baseline: the same architecture, data and schedule as `dgemma train`, encoder next-token loss only
    python -m scripts.eval_text_model train-ar --config runs/shakespeare_config.json \
        --data text:runs/shakespeare/train.txt --tokenizer runs/shakespeare/tokenizer --out runs/shakespeare/ar \
        --steps 600 --batch-size 16 --lr 2e-3 --min-lr-ratio 0.1 --warmup 40 --save-every 100 --seed 0 \
        --data-arg window=136 --data-arg min_prompt=8 --data-arg min_response=128 --data-arg bos_id=2 --no-eos-canvas
    # held-out losses of any number of checkpoints (JSON on stdout)
    python -m scripts.eval_text_model eval runs/shakespeare/diffusion/final runs/shakespeare/ar/final \
        --heldout runs/shakespeare/heldout.txt --tokenizer runs/shakespeare/tokenizer
    # the shipped asset: weights + config from a run, the tokenizer files, the tuned generation_config.json
    python -m scripts.eval_text_model export runs/shakespeare/diffusion_cont/final \
        --tokenizer runs/shakespeare/tokenizer --out dgemma/assets/shakespeare --dtype float32
    # generation statistics at the checkpoint's defaults (tokens/forward, steps/canvas, tokens/s)
    python -m scripts.eval_text_model sample dgemma/assets/shakespeare --seeds 3 --score-with runs/shakespeare/ar/final
    # comparing sampler settings: one line of statistics per --params
    python -m scripts.eval_text_model sample runs/shakespeare/diffusion/final --quiet \
        --score-with runs/shakespeare/ar/final --params '{"entropy_bound": 2.0}' \
        --params '{"entropy_bound": 20.0, "t_min": 0.1, "t_max": 0.5}'

`train-ar` drives dgemma's own `Trainer` (dgemma/train/trainer.py) exactly as `dgemma train` does, with
`TrainConfig(decoder_loss_weight=0, self_cond_prob=0)`. The decoder's loss then has weight 0 and contributes no
gradient, so its forward is skipped (`encoder_only_loss_parts`): the same gradients, less compute per step.

`eval` reports, on the held-out text (never trained on, nor used for the tokenizer):
- `encoder_nll`: next-token NLL per token of the causal (encoder) pass over consecutive `--context`-token windows,
  each after a <bos> (as training saw it); also in bits per character of the held-out text;
- `denoise_loss`: the training objective's decoder term on held-out examples laid out as in training (prompt of
  `--prompt-len` tokens after <bos>, response of `--response-len` tokens, one canvas chosen, t ~ U(1e-3, 1),
  self-conditioning on half the rows): mean cross-entropy over all canvas positions, and over the corrupted ones;
- `denoise_by_t`: the same cross-entropy on corrupted positions only at fixed noise levels.
All draws are seeded, so the numbers are reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# -- the AR baseline -------------------------------------------------------------------------------------------------


def encoder_only_loss_parts(model, batch, cfg, d=None):
    """`objective.loss_parts` when the decoder's loss weight is 0: the encoder's next-token cross-entropy only."""
    from dgemma.train.objective import EncoderSegment, LossParts, encoder_targets

    (he,) = model([EncoderSegment(batch.input_ids, batch.lengths, model.text)])
    valid = encoder_targets(batch, cfg)
    enc_sum = F.cross_entropy(model.logits(he[:, :-1][valid]), batch.input_ids[:, 1:][valid], reduction="sum")
    return LossParts(enc_sum.new_zeros(()), batch.size * cfg.canvas_length, enc_sum, int(valid.sum()))


def train_ar(argv: list[str]) -> int:
    from dgemma.model import DiffusionGemma
    from dgemma.tokenizer import Tokenizer
    from dgemma.train import cli, trainer as trainer_mod
    from dgemma.train.data import make_source
    from dgemma.train.trainer import TrainConfig, Trainer

    args = cli.build_parser().parse_args(argv)
    if not args.config or args.init_from or args.lora_rank:
        raise SystemExit("train-ar trains from scratch: give --config (no --init-from / --lora-rank)")
    model = DiffusionGemma(cli._model_config(args.config))
    model.init_weights(generator=torch.Generator().manual_seed(args.seed))  # the same init as `dgemma train`
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    source = make_source(args.data, seed=args.seed, tokenizer=tokenizer, **cli._data_options(args.data_arg))
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        save_every=args.save_every, log_every=args.log_every, seed=args.seed, self_cond_prob=0.0,
        decoder_loss_weight=0.0, require_eos=not args.no_eos_canvas, progress=not args.no_progress)
    trainer_mod.loss_parts = encoder_only_loss_parts  # the trainer's objective, minus the zero-weight decoder term
    tr = Trainer(model, source, cfg, args.out, device=args.device or "cpu", resume=args.resume)
    records = tr.train()
    path = tr.export(Path(args.out) / "final")
    print(json.dumps({"final": str(path), "step": tr.step, "loss": records[-1]["loss"] if records else None}))
    return 0


# -- held-out evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def encoder_nll(model, ids: list[int], bos: int, context: int, batch: int = 16) -> tuple[float, int]:
    """Summed next-token NLL (nats) and target count over consecutive `context`-token windows, each after <bos>."""
    from dgemma.train.objective import EncoderSegment

    rows = [[bos] + ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
    total, count = 0.0, 0
    for s in range(0, len(rows), batch):
        x = torch.tensor(rows[s:s + batch])
        seg = EncoderSegment(x, torch.full((x.shape[0],), x.shape[1]), model.text)
        (h,) = model([seg])
        logits = model.logits(h[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total, count


@torch.no_grad()
def denoise_losses(model, text: str, tokenizer, prompt_len: int, response_len: int, n: int, seed: int,
                   fixed_t: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0), batch: int = 16) -> dict:
    from dgemma.train.data import TextCorpusSource, collate
    from dgemma.train.objective import ObjectiveConfig, draw, run

    c = model.config.canvas_length
    src = TextCorpusSource(text, tokenizer, seed=seed, window=prompt_len + response_len, min_prompt=prompt_len,
                           min_response=response_len, bos_id=tokenizer.bos_token_id)
    obj = ObjectiveConfig(canvas_length=c, vocab_size=model.text.vocab_size, seed=seed)

    def ce(batch_, d):
        sc = None
        if bool(d.use_sc.any()):  # as in training: a gradient-free first pass feeds the self-conditioned rows
            _, h1 = run(model, batch_.input_ids, batch_.lengths, d.noisy, d.prefix_lens)
            sc = model.soft_embed(model.logits(h1)) * d.use_sc[:, None, None]
        _, hd = run(model, batch_.input_ids, batch_.lengths, d.noisy, d.prefix_lens, sc)
        return F.cross_entropy(model.logits(hd).float().flatten(0, 1), d.clean.flatten(), reduction="none").view(
            d.clean.shape)

    sums = {"all": [0.0, 0], "corrupted": [0.0, 0]} | {f"t={t}": [0.0, 0] for t in fixed_t}
    for s in range(0, n, batch):
        idx = list(range(s, min(n, s + batch)))
        b = collate([src.example(i) for i in idx], idx, c, model.text.eos_token_id, model.text.pad_token_id,
                    require_eos=False)
        d = draw(b, obj)
        loss = ce(b, d)
        sums["all"][0] += float(loss.sum())
        sums["all"][1] += loss.numel()
        sums["corrupted"][0] += float(loss[d.corrupted].sum())
        sums["corrupted"][1] += int(d.corrupted.sum())
        g = torch.Generator().manual_seed(seed + s)
        for t in fixed_t:  # the same examples and canvases, every token corrupted with probability t
            mask = torch.rand(d.clean.shape, generator=g) < t
            noise = torch.randint(obj.vocab_size, d.clean.shape, generator=g)
            d.noisy, d.corrupted = torch.where(mask, noise, d.clean), mask
            loss = ce(b, d)
            sums[f"t={t}"][0] += float(loss[mask].sum())
            sums[f"t={t}"][1] += int(mask.sum())
    return {k: round(v[0] / max(v[1], 1), 4) for k, v in sums.items()}


def evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval_text_model eval")
    p.add_argument("models", nargs="+", help="checkpoint folders")
    p.add_argument("--heldout", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--context", type=int, default=136, help="tokens per encoder window (after <bos>)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from dgemma import checkpoint
    from dgemma.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.tokenizer)
    text = Path(args.heldout).read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    chars_per_token = len(text) / len(ids)
    results = {}
    for m in args.models:
        t0 = time.perf_counter()
        model = checkpoint.load(m, dtype=torch.float32).model.eval()
        total, count = encoder_nll(model, ids, tok.bos_token_id, args.context)
        nll = total / count
        dn = denoise_losses(model, text, tok, args.prompt_len, args.response_len, args.examples, args.seed)
        results[m] = {"encoder_nll": round(nll, 4), "encoder_ppl": round(math.exp(nll), 2),
                      "bits_per_char": round(nll / math.log(2) / chars_per_token, 4), "encoder_tokens": count,
                      "denoise_loss": dn["all"], "denoise_loss_corrupted": dn["corrupted"],
                      "denoise_by_t": {k: v for k, v in dn.items() if k.startswith("t=")},
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({m: results[m]}), file=sys.stderr)
    print(json.dumps({"heldout_tokens": len(ids), "chars_per_token": round(chars_per_token, 4),
                      "results": results}, indent=1))
    return 0


# -- export ----------------------------------------------------------------------------------------------------------

# The shipped defaults, for the DiffusionGemma entropy-bound sampler (chosen with `sample --params ... --score-with`
# over 3 prompts x 3 seeds; see docs/shakespeare_model.md): a loose entropy bound and a cool schedule let this small
# model settle a canvas in ~10 forwards (~6 tokens per forward) with samples as good as the 32-48-step settings'.
# Two canvases per request, as in training (8-token prompt + 128-token response).
GENERATION = dict(max_new_tokens=128, max_denoising_steps=32, entropy_bound=20.0, t_min=0.1, t_max=0.5,
                  stability_threshold=1, confidence_threshold=0.005)


def export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval_text_model export")
    p.add_argument("model", help="the trained checkpoint folder (e.g. runs/shakespeare/diffusion/final)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", default="dgemma/assets/shakespeare")
    p.add_argument("--dtype", default="float32", help="weights dtype of the asset (float32 or bfloat16)")
    p.add_argument("--generation", default=json.dumps(GENERATION), help="generation defaults (JSON)")
    args = p.parse_args(argv)
    from dgemma import checkpoint
    from dgemma.config import GenerationConfig

    ck = checkpoint.load(args.model, dtype=torch.float32)
    gen = GenerationConfig(**json.loads(args.generation), eos_token_ids=tuple(ck.config.eos_token_ids))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    checkpoint.save(ck.model, out, generation=gen, dtype=checkpoint.parse_dtype(args.dtype))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(args.tokenizer) / name, out / name)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print(json.dumps({"out": str(out), "bytes": sum(sizes.values()), "files": sizes}))
    return 0


# -- sampling statistics ---------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_nll(scorer, prompt_ids: list[int], out_ids: list[int]) -> float:
    """Mean next-token NLL of `out_ids` after `prompt_ids` under `scorer`'s causal (encoder) pass."""
    from dgemma.train.objective import EncoderSegment

    x = torch.tensor([prompt_ids + out_ids])
    (h,) = scorer([EncoderSegment(x, torch.tensor([x.shape[1]]), scorer.text)])
    n = len(prompt_ids)
    logits = scorer.logits(h[0, n - 1:-1]).float()
    return float(F.cross_entropy(logits, x[0, n:]))


def sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval_text_model sample")
    p.add_argument("model", nargs="?", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--params", action="append", default=[],
                   help="SamplingParams overrides (JSON); repeat to compare settings (default: the checkpoint's)")
    p.add_argument("--score-with", help="checkpoint whose encoder scores the samples (e.g. the AR baseline): "
                                        "mean NLL per generated token, lower = more like the corpus")
    p.add_argument("--quiet", action="store_true", help="statistics only, no sample texts")
    p.add_argument("--corpus", default="data/tinyshakespeare.txt",
                   help="for `real_words`: the fraction of generated words that occur in this text")
    args = p.parse_args(argv)
    import re

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())

    known = set(words(Path(args.corpus).read_text(encoding="utf-8"))) if Path(args.corpus).is_file() else None
    torch.set_num_threads(1)
    from dgemma import LLM, SamplingParams, checkpoint

    llm = LLM(args.model)
    scorer = checkpoint.load(args.score_with, dtype=torch.float32).model.eval() if args.score_with else None
    prompts = args.prompt or ["ROMEO:", "To be, or not to be", "KING HENRY VI:\nWhat"]
    for overrides in args.params or ["{}"]:
        s = {"tokens": 0, "forwards": 0, "seconds": 0.0, "steps": [], "nll": [], "words": 0, "real": 0}
        for prompt in prompts:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                out = llm.generate(prompt, SamplingParams(seed=seed, **json.loads(overrides)))[0]
                dt = time.perf_counter() - t0
                s["tokens"] += len(out.token_ids)
                s["forwards"] += out.decoder_forwards
                s["seconds"] += dt
                s["steps"] += list(out.steps_per_canvas)
                if known is not None:
                    ws = words(out.text)
                    s["words"] += len(ws)
                    s["real"] += sum(w in known for w in ws)
                if scorer is not None and out.token_ids:
                    s["nll"].append(continuation_nll(scorer, list(out.prompt_token_ids), list(out.token_ids)))
                if not args.quiet:
                    print(f"--- {prompt!r} seed {seed}: {len(out.token_ids)} tokens, steps {out.steps_per_canvas}, "
                          f"{out.tokens_per_forward:.2f} tokens/forward, {len(out.token_ids) / dt:.0f} tokens/s, "
                          f"{out.finish_reason}\n{prompt}{out.text}")
        stats = {"params": json.loads(overrides),
                 "tokens_per_forward": round(s["tokens"] / max(s["forwards"], 1), 2),
                 "mean_steps_per_canvas": round(sum(s["steps"]) / max(len(s["steps"]), 1), 2),
                 "tokens_per_second": round(s["tokens"] / s["seconds"], 1)}
        if s["words"]:
            stats["real_words"] = round(s["real"] / s["words"], 3)
        if s["nll"]:
            stats["scored_nll"] = round(sum(s["nll"]) / len(s["nll"]), 3)
        print(json.dumps(stats), flush=True)
    return 0


COMMANDS = {"train-ar": train_ar, "eval": evaluate, "export": export, "sample": sample}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m scripts.eval_text_model {{{','.join(COMMANDS)}}} ...\n\n{__doc__}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
