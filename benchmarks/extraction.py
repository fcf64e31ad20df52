"""Constrained decoding on a model that has learned the task: fine-tune the embedded default model on the synthetic
extraction task (dgemma/extraction.py: a sentence about a person -> {"name","age","city","job"}) on the CPU, then
decode held-out sentences four ways: dgemma (block diffusion) and the same model decoded autoregressively (its
encoder's next-token head, greedy, `dgemma.autoregressive.generate_ar`), each without and with the JSON-schema
constraint (llguidance; diffusion: the masking sweep of docs/constrained.md, AR: the per-token mask).

    python benchmarks/extraction.py --steps 250; ... --steps 500; ... --steps 750   # the published run (resumes)
    python benchmarks/extraction.py --skip-train          # evaluate the model already in --out/final

The published run trained in three stages (250 steps, then resumed with the cosine re-aimed at 500, then at 750):
12,000 examples, 59 min on one thread of a 2-core machine shared with 5-10 other processes; each evaluation takes
3-10 min more.

Training: full fine-tune with dgemma.train.Trainer, the block-diffusion decoder loss plus the encoder's next-token
loss on the answer (so that both decoders are trained, on the same examples), training records from seed 0.
Evaluation: --n-test records from seed 1 (fresh sentences; the name, city and job lists are shared with training,
the combinations and ages are new draws), at most 64 new tokens (one canvas), diffusion at the checkpoint's sampler
settings, request i seeded i. Reports JSON validity (jsonschema against dgemma.extraction.SCHEMA), field accuracy,
exact records, the share ending by length, and the cost (decoder steps or AR forwards).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dgemma import checkpoint
from dgemma.autoregressive import generate_ar
from dgemma.constraint import Constraint, compile_grammar, ll_tokenizer
from dgemma.extraction import SCHEMA, ExtractionSource, prompt_text, records, score
from dgemma.llm import LLM, default_model_path
from dgemma.sampling_params import SamplingParams
from dgemma.tokenizer import Tokenizer
from dgemma.train import Trainer
from dgemma.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 64


def train(out: Path, steps: int, batch_size: int, lr: float) -> dict:
    base = default_model_path()
    ck = checkpoint.load(base, dtype=torch.float32)
    tok = Tokenizer.from_dir(base)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 20), min_lr_ratio=0.1,
                      weight_decay=0.01, save_every=steps, log_every=10, encoder_loss_on_prompt=False,
                      progress=False, seed=0)
    trainer = Trainer(ck.model, ExtractionSource(tok, seed=0), cfg, out, generation=ck.generation,
                      passthrough=ck.passthrough, device="cpu", init_from=str(base), tokenizer_dir=base)
    trainer.train()  # resumes from OUT's latest checkpoint when there is one (a larger --steps continues it)
    trainer.export(out / "final")
    return training_summary(out)


def training_summary(out: Path) -> dict:
    """What the run folder's metrics log says: steps, examples, wall time (all stages) and the loss curve."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    last = logged[-1]
    return {"steps": last["step"], "examples": last["examples"], "wall_s": round(last["wall_s"], 1),
            "loss": {x["step"]: round(x["loss"], 4) for x in logged},
            "decoder_loss": round(last["decoder_loss"], 4), "encoder_loss": round(last["encoder_loss"], 4)}


def evaluate(final: Path, n: int) -> list[dict]:
    truths = records(1, n)
    llm = LLM(final, max_num_seqs=16)
    tok, model = llm.tokenizer, llm.model
    prompts = [tok.encode(prompt_text(r.sentence)) for r in truths]
    eos = tok.eos_token_id
    results = []

    def report(method: str, constrained: bool, texts: list[str], ended_by_length: int, cost: float, unit: str,
               secs: float) -> None:
        s = score(texts, truths)
        results.append({"method": method, "constrained": constrained, **s, "length": ended_by_length / n,
                        unit: cost, "seconds": round(secs, 1)})
        print(f"{method:<10} {'schema' if constrained else 'none':<7} valid {100 * s['valid']:5.1f}%  fields "
              f"{100 * s['field_accuracy']:5.1f}%  exact {100 * s['exact']:5.1f}%"
              f"  length {100 * ended_by_length / n:5.1f}%"
              f"  {unit} {cost:.2f}  ({secs:.0f} s)", flush=True)

    for constrained in (False, True):
        params = [SamplingParams(max_new_tokens=MAX_NEW, seed=i, json_schema=SCHEMA if constrained else None)
                  for i in range(n)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        report("diffusion", constrained, [o.text for o in outs], sum(o.finish_reason == "length" for o in outs),
               float(np.mean([o.decoder_forwards for o in outs])),
               "decoder_steps", time.perf_counter() - t0)
    grammar = compile_grammar(json_schema=SCHEMA)
    V = model.config.text.vocab_size
    for constrained in (False, True):
        cons = [Constraint(grammar, ll_tokenizer(tok, V, eos), V, eos) for _ in range(n)] if constrained else None
        t0 = time.perf_counter()
        outs, forwards = [], []
        for start in range(0, n, 16):
            part = slice(start, start + 16)
            o, fw = generate_ar(model, prompts[part], MAX_NEW, eos_ids=(eos,),
                                constraints=cons[part] if cons else None)
            outs += o
            forwards += [len(x) for x in o]
        texts = [tok.decode([t for t in o if t != eos]) for o in outs]
        report("AR", constrained, texts, sum(eos not in o for o in outs), float(np.mean(forwards)),
               "forwards", time.perf_counter() - t0)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "extraction"), help="run folder (model in OUT/final)")
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "extraction.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.skip_train:
        train(out, args.steps, args.batch_size, args.lr)
    training = {"batch_size": args.batch_size, "lr": args.lr, **training_summary(out)}
    print(f"trained: {training}", flush=True)
    results = evaluate(out / "final", args.n_test)
    print("\n| decoder | constraint | valid JSON | field accuracy | exact records | ended by length | cost |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cost = f"{r['decoder_steps']:.1f} denoising steps" if "decoder_steps" in r else f"{r['forwards']:.1f} forwards"
        print(f"| {r['method']} | {'JSON schema' if r['constrained'] else 'none'} | {100 * r['valid']:.1f}% | "
              f"{100 * r['field_accuracy']:.1f}% | {100 * r['exact']:.1f}% | {100 * r['length']:.1f}% | {cost} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"task": "dgemma/extraction.py", "schema": SCHEMA, "n_test": args.n_test,
                                           "threads": args.threads, "training": training, "results": results},
                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
