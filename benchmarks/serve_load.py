"""Serving throughput of `dgemma serve` at several concurrencies (default 1 and 8), as a table and JSON.

    python benchmarks/serve_load.py                       # tiny random checkpoint, concurrency 1 and 8
    python benchmarks/serve_load.py --model ./ckpt --concurrency 1 4 8 16 --max-tokens 128

The server runs as a subprocess (`python -m dgemma.server.cli`, loopback, free port) so that the load generator
does not share its interpreter; every request streams, ignores EOS and runs a fixed number of denoising steps per
canvas (convergence checks off), so each concurrency level does the same work per request and tokens/s compare.
The ratio printed last is the throughput at the highest concurrency over that at concurrency 1: continuous
batching puts the canvases of concurrent requests in one forward. Numbers on a shared CPU are noisy: each level
runs `--repeats` times and the best run is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, args, seed: int) -> dict:
    body = {"prompt": "To be, or not to be, that is the question", "max_tokens": args.max_tokens, "seed": seed,
            "stream": True, "ignore_eos": True, "max_denoising_steps": args.steps, "stability_threshold": 0,
            "confidence_threshold": 0, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj["choices"] and obj["choices"][0].get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def level(url: str, args, concurrency: int) -> dict:
    n = args.requests_per_worker * concurrency
    seeds = iter(range(n))
    results: list[dict] = []

    async def worker(client):
        for seed in seeds:  # shared iterator: each worker takes the next request when its previous one ends
            results.append(await one(client, args, seed))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_latency_s": statistics.mean(r["latency"] for r in results),
            "p50_ttft_s": statistics.median(r["ttft"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random one made here)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests-per-worker", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (fixed)")
    p.add_argument("--canvas-length", type=int, default=16, help="for the tiny checkpoint")
    p.add_argument("--hidden-size", type=int, default=64, help="for the tiny checkpoint")
    p.add_argument("--layers", type=int, default=2, help="for the tiny checkpoint")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "dgemma_serve_load.json"))
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.helpers import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(Path(tmp.name) / "tiny", canvas_length=args.canvas_length,
                                         hidden_size=args.hidden_size, num_hidden_layers=args.layers))
    port = free_port()
    cmd = [sys.executable, "-m", "dgemma.server.cli", model, "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(max(args.concurrency)), "--max-model-len", str(64 + args.max_tokens + 64),
           "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        asyncio.run(level(url, argparse.Namespace(**{**vars(args), "requests_per_worker": 1}), 2))  # warm-up
        rows = []
        for c in args.concurrency:
            runs = [asyncio.run(level(url, args, c)) for _ in range(args.repeats)]
            rows.append(max(runs, key=lambda r: r["tokens_per_s"]))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()

    print(f"{'concurrency':>11} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'latency s':>9} "
          f"{'p50 TTFT s':>10}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['tokens']:>7} {r['wall_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['mean_latency_s']:>9.3f} {r['p50_ttft_s']:>10.3f}")
    base = next((r for r in rows if r["concurrency"] == 1), rows[0])
    top = rows[-1]
    ratio = top["tokens_per_s"] / base["tokens_per_s"]
    print(f"throughput ratio concurrency {top['concurrency']} / {base['concurrency']}: {ratio:.2f}x")
    tpf = [line for line in metrics.splitlines() if line.startswith("dgemma_tokens_per_forward ")]
    tiny = f"tiny random (tests/helpers.py): hidden {args.hidden_size}, {args.layers} layers, canvas {args.canvas_length}"
    result = {"rows": rows, "ratio": ratio, "model": args.model or tiny,
              "max_tokens": args.max_tokens, "steps_per_canvas": args.steps, "device": args.device,
              "tokens_per_forward": float(tpf[0].split()[1]) if tpf else None}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
