"""The `dgemma` command: generate, serve, train, sudoku, export.

    dgemma generate "To be, or not to be"                  # embedded default model, live canvas view
    dgemma generate --model google/diffusiongemma-26B-A4B-it --chat "Hello" --json
    dgemma serve [MODEL] --port 8000
    dgemma plan google/diffusiongemma-26B-A4B-it --max-model-len 262144 --gpu-memory-gib 80 --json
    dgemma train --config cfg.json --data text:corpus.txt --tokenizer DIR --out runs/x
    dgemma sudoku solve 53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    dgemma export MODEL OUT --quantization fp8

Every multi-word flag also takes underscores (`--max_new_tokens`). Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

SUBCOMMANDS = {
    "generate": ("generate text by block diffusion", "dgemma.cli", "generate_main"),
    "serve": ("serve an OpenAI-compatible API", "dgemma.server.cli", "main"),
    "plan": ("print the serving memory plan of a model (no weights loaded)", "dgemma.plan", "main"),
    "train": ("train or fine-tune a block-diffusion model", "dgemma.train.cli", "main"),
    "sudoku": ("train, evaluate and run the Sudoku solver", "dgemma.sudoku.cli", "main"),
    "export": ("write a checkpoint in another form (e.g. --quantization fp8)", "dgemma.export", "main"),
}


class Parser(argparse.ArgumentParser):
    """argparse where every `--multi-word` flag also answers to `--multi_word` (as vLLM's parser does)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        fixed = []
        for a in args:
            if a == "--":
                fixed += args[len(fixed):]
                break
            if a.startswith("--") and len(a) > 2:
                name, eq, value = a.partition("=")
                a = "--" + name[2:].replace("_", "-") + eq + value
            fixed.append(a)
        return super().parse_known_args(fixed, namespace)


def fail(msg: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"dgemma: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def add_sampler_flags(p: Parser) -> None:
    g = p.add_argument_group("sampler (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--max-denoising-steps", type=int, help="hard cap of decoder forwards per canvas")
    g.add_argument("--entropy-bound", type=float, help="acceptance: sum of accepted entropies minus their max")
    g.add_argument("--t-min", type=float, help="temperature at the last step")
    g.add_argument("--t-max", type=float, help="temperature at the first step")
    g.add_argument("--stability-threshold", type=int)
    g.add_argument("--confidence-threshold", type=float, help="0 disables early stopping")
    g.add_argument("--top-k", type=int, default=0, help="exploration mask (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="exploration mask (1 = off)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--seed", type=int)


def sampling_params(args, trace: bool = False):
    from .sampling_params import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, max_denoising_steps=args.max_denoising_steps,
        entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max,
        stability_threshold=args.stability_threshold, confidence_threshold=args.confidence_threshold,
        top_k=args.top_k, top_p=args.top_p, stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed, trace=trace)


def constraint_params(args) -> dict:
    """The SamplingParams fields of `generate`'s constraint flags (the schema file read and parsed here)."""
    out = {}
    if args.json_schema is not None:
        try:
            out["json_schema"] = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except OSError as e:
            fail(f"--json-schema: cannot read {args.json_schema}: {e.strerror or e}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            fail(f"--json-schema: {args.json_schema} is not valid JSON: {e}")
    if args.regex is not None:
        out["regex"] = args.regex
    if args.choice is not None:
        out["choice"] = args.choice
    if args.grammar is not None:
        try:
            out["grammar"] = Path(args.grammar).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--grammar: cannot read {args.grammar}: {getattr(e, 'strerror', None) or e}")
    if args.template is not None:
        out["template"] = args.template
        if args.template.startswith("@"):
            try:
                out["template"] = Path(args.template[1:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                fail(f"--template: cannot read {args.template[1:]}: {getattr(e, 'strerror', None) or e}")
    return out


def add_model_flags(p: Parser) -> None:
    p.add_argument("--model", help="checkpoint folder or Hugging Face Hub id (default: the embedded model)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: hold the weights in FP8, quantised as they load (FP8 checkpoints need no flag)")
    p.add_argument("--language-model-only", action="store_true",
                   help="load the text model alone: the vision tower is not loaded, images are refused")
    add_mode_flags(p)
    add_parallel_flags(p)


def add_parallel_flags(p) -> None:
    """Tensor and expert parallelism over several processes (docs/parallel.md)."""
    g = p.add_argument_group("parallelism (docs/parallel.md)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N processes (torch.distributed: NCCL on GPUs, gloo on the CPU); "
                        "spawned here, or one per torchrun rank")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="place whole experts on ranks instead of splitting every expert")
    g.add_argument("--tp-timeout", type=float, default=None, metavar="SECONDS",
                   help="a collective that waits longer fails (a dead or stuck rank); default 300")


def add_mode_flags(p) -> None:
    """The engine mode (docs/fast_step.md): exact (batch-invariant) or fast, and compiling the fast step."""
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="exact mode: a request's tokens never depend on its batch mates, token-identical to "
                        "transformers (default on the CPU); --no-batch-invariant: the fast, sync-free step "
                        "(default on other devices)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fast step (CUDA graphs on CUDA; default: on for CUDA)")


def chat_inputs(llm, prompt: str, image_paths: list[str]):
    """(prompt ids, images) of a one-message chat: the images first, then the text. Bad images end the command."""
    from .image_processing import ImageError

    content = [{"type": "image", "path": p} for p in image_paths] + [{"type": "text", "text": prompt}]
    try:
        return llm.chat_inputs([{"role": "user", "content": content if image_paths else prompt}])
    except (ImageError, ValueError) as e:
        fail(str(e))


def check_device(device: str) -> str:
    """`device` if torch can use it here, else a ValueError in one line (e.g. --device cuda on a CPU-only machine)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available; use --device cpu")
    return device


def generate_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma generate", description="Generate text by denoising canvases in parallel.")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    add_model_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to ask about, before the prompt (repeatable; needs --chat and a vision model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--show-canvas", action="store_true", help="live terminal view of the canvas being denoised")
    p.add_argument("--trace-out", help="write the denoising trace as an animated GIF (or a folder of PNGs)")
    add_sampler_flags(p)
    g = p.add_argument_group("constrained output (one of; docs/constrained.md)")
    g.add_argument("--json-schema", metavar="FILE", help="a JSON schema file the output must satisfy")
    g.add_argument("--regex", help="a regex the whole output must match")
    g.add_argument("--choice", nargs="+", metavar="TEXT", help="the output is exactly one of these strings")
    g.add_argument("--grammar", metavar="FILE", help="a context-free grammar file (Lark, llguidance's dialect)")
    g.add_argument("--template", metavar="T", help="an infilling template: fixed text and {{...}} holes, e.g. "
                   "$'Name: {{max=8}}\\nAge: {{regex=\"[0-9]+\"}}' (or @FILE); fixed spans at known positions are "
                   "pinned on the canvas")
    args = p.parse_args(argv)
    constraint = constraint_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.image and not args.chat:
        fail("--image needs --chat (the chat template places the image)")
    if args.image and args.language_model_only:
        fail("--image cannot be used with --language-model-only (the vision tower is not loaded)")

    from .llm import LLM

    check_device(args.device)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, batch_invariant=args.batch_invariant,
              compile=args.compile, quantization=args.quantization, language_model_only=args.language_model_only,
              tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
              tp_timeout_s=args.tp_timeout)
    load_s = time.perf_counter() - t0
    ids, images = chat_inputs(llm, prompt, args.image) if args.chat else (llm.encode(prompt), None)
    params = sampling_params(args, trace=bool(args.show_canvas or args.trace_out))
    if constraint:
        try:
            params = dataclasses.replace(params, **constraint)
        except ValueError as e:
            fail(str(e))
    t1 = time.perf_counter()
    if args.show_canvas:
        from rich.console import Console

        from .live import LiveCanvas

        # With --json, stdout carries the JSON object alone (it may be a pipe): the live view goes to stderr.
        view = LiveCanvas(llm.tokenizer, llm.config.canvas_length, prompt_text=prompt,
                          console=Console(stderr=True) if args.json else None)
        out = view.run(llm.stream(ids, params, images=images))
    elif images is not None:
        out = [ev for ev in llm.stream(ids, params, images=images) if ev.kind == "finished"][0].output
    else:
        out = llm.generate([ids], params)[0]
    gen_s = time.perf_counter() - t1
    if args.trace_out:
        from .visualize import render_trace

        written = render_trace(out.trace, llm.tokenizer, Path(args.trace_out), prompt=prompt)
        print(f"dgemma: wrote the denoising trace ({len(out.trace)} steps) to {written}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
            "steps_per_canvas": out.steps_per_canvas, "decoder_forwards": out.decoder_forwards,
            "tokens_per_forward": round(out.tokens_per_forward, 3), "seconds": round(gen_s, 3),
            "tokens_per_second": round(len(out.token_ids) / gen_s, 1) if gen_s else None,
            "load_seconds": round(load_s, 3), "error": out.error.message if out.error else None,
        }))
    elif not args.show_canvas:
        print(out.text)
        print(f"[{len(out.token_ids)} tokens, {len(out.canvases)} canvases, steps {out.steps_per_canvas}, "
              f"{out.tokens_per_forward:.2f} tokens/forward, {len(out.token_ids) / gen_s:.1f} tokens/s]",
              file=sys.stderr)
    if out.error is not None:  # e.g. the constraint hit a dead end: the text above is what was committed
        print(f"dgemma: generation failed: {out.error.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = Parser(prog="dgemma", description="DiffusionGemma-style block-diffusion text generation.",
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="commands:\n" + "\n".join(f"  {k:<10}{v[0]}" for k, v in SUBCOMMANDS.items())
                 + "\n\nRun `dgemma COMMAND --help` for a command's flags.")
    top.add_argument("command", nargs="?", choices=list(SUBCOMMANDS))
    top.add_argument("--version", action="store_true")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in SUBCOMMANDS:
        top.print_usage(sys.stderr)
        fail(f"unknown command {cmd!r} (choose from {', '.join(SUBCOMMANDS)})")
    logging.basicConfig(level=logging.WARNING, format="dgemma: %(message)s")
    import importlib

    _, module, func = SUBCOMMANDS[cmd]
    try:
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        # Bad checkpoints, configs, flags and inputs all raise ValueError subclasses with a one-line message.
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
