"""Constrained decoding with the embedded default model: validity over many seeds, and the cost per denoising step.

    python benchmarks/constrained.py                    # 200 seeds, prints a table, writes results/constrained.json
    python benchmarks/constrained.py --seeds 20 --steps 6     # quicker

Validity: the default model writes no JSON by itself; every output under the JSON schema (nested object, array,
enum, integer ranges), the regex and the choice of tests/test_constrained.py must be valid, or end with
finish_reason "length" (counted); "unbounded" (a string without maxLength) shows where length endings come from,
"none" gives the unconstrained steps per canvas. Cost: seconds per denoising step at canvas 64 (the model's), one request,
a fixed number of steps (confidence threshold 0), with and without the JSON-schema constraint; best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_constrained import CHOICE, GRAMMAR, REGEX, SCHEMA, _balanced_sum  # noqa: E402 - the tests' constraints

from dgemma.llm import LLM  # noqa: E402
from dgemma.sampling_params import SamplingParams  # noqa: E402


def valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


KINDS = {
    "json_schema": (dict(json_schema=SCHEMA), valid_json),
    "regex": (dict(regex=REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    "choice": (dict(choice=CHOICE), lambda t: t in CHOICE),
    "grammar": (dict(grammar=GRAMMAR), _balanced_sum),
    "unbounded": (dict(json_schema={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"],
                                    "additionalProperties": False}), lambda t: isinstance(json.loads(t)["s"], str)),
    "none": ({}, lambda t: False),  # the control: no constraint (its "valid" column is 0 by definition)
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None,
                    help="max denoising steps per canvas in the validity runs (default: the checkpoint's)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--timing-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "constrained.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(max_num_seqs=8)
    result = {"seeds": args.seeds, "max_denoising_steps": args.steps, "max_new_tokens": args.max_new_tokens,
              "validity": {}, "timing": {}}
    print(f"{'constraint':<12} {'valid':>6} {'length':>6} {'invalid':>7} {'mean steps/canvas':>18}")
    for name, (kw, ok) in KINDS.items():
        outs = llm.generate(["ROMEO:"] * args.seeds, [SamplingParams(seed=s, max_denoising_steps=args.steps,
                                                                     max_new_tokens=args.max_new_tokens, **kw)
                                                      for s in range(args.seeds)])
        n_len = sum(o.finish_reason == "length" for o in outs)
        n_ok = sum(o.finish_reason == "stop" and ok(o.text) for o in outs)
        steps = [c.steps for o in outs for c in o.canvases]
        row = {"valid": n_ok, "length": n_len, "invalid": len(outs) - n_ok - n_len,
               "mean_steps_per_canvas": sum(steps) / len(steps)}
        result["validity"][name] = row
        print(f"{name:<12} {n_ok:>6} {n_len:>6} {row['invalid']:>7} {row['mean_steps_per_canvas']:>18.2f}")
    C = llm.config.canvas_length
    print(f"\nseconds per denoising step, canvas {C}, batch 1, {args.timing_steps} steps")
    for name, kw in [("none", {}), ("json_schema", dict(json_schema=SCHEMA))]:
        best = float("inf")
        for r in range(args.repeats + 1):  # the first run warms up
            p = SamplingParams(seed=r, max_denoising_steps=args.timing_steps, confidence_threshold=0,
                               max_new_tokens=C, **kw)
            t0 = time.perf_counter()
            o = llm.generate(["ROMEO:"], p)[0]
            dt = (time.perf_counter() - t0) / o.decoder_forwards
            if r:
                best = min(best, dt)
        result["timing"][name] = {"canvas": C, "s_per_step": best}
        print(f"{name:<12} {best * 1e3:8.2f} ms/step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
