"""`dgemma serve [MODEL] [options]`: parse the command line, plan memory, load the model, run uvicorn.

    dgemma serve ./my-checkpoint --max-num-seqs 16 --max-model-len 4096 --canvas-length 256 --api-key sk-local
    dgemma serve --diffusion-config '{"canvas_length": 256, "max_denoising_steps": 48}'

Every multi-word flag takes dashes or underscores (`--canvas_length 256`), as vLLM's do. With no MODEL the embedded
default model is served. The server binds 127.0.0.1 unless --host says otherwise. Exit status 2 means the
configuration was refused before anything was loaded (bad flags, an unavailable --device, a memory plan that cannot
fit, a missing model); exit status 1 means the address cannot be listened on (e.g. the port is in use). The port is
bound before the model loads, so a busy port fails at once.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import replace

from ..cli import Parser, add_mode_flags, add_parallel_flags, check_device
from . import ServerConfig

log = logging.getLogger("dgemma.server")

# --diffusion-config keys: the two model-shape ones LLM takes, and denoising defaults for every request
_SHAPE_KEYS = ("canvas_length", "max_denoising_steps")
_DEFAULT_KEYS = ("entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dgemma serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="OpenAI-compatible server for block-diffusion models (endpoints /v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics; the playground at /).",
        epilog="Per-request extras (extra body fields): max_denoising_steps, entropy_bound, t_min, t_max,\n"
               "stability_threshold, confidence_threshold, ignore_eos, stop_token_ids, and\n"
               '"dgemma": {"drafts": true} to stream every denoising step as "dgemma.draft" chunks.\n'
               "`temperature` is accepted but has no effect: the schedule anneals t_max -> t_min per canvas.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--canvas-length", type=int, default=None, help="tokens denoised in parallel per canvas")
    p.add_argument("--max-denoising-steps", type=int, default=None, help="default cap of steps per canvas")
    p.add_argument("--diffusion-config", default=None, help='JSON, e.g. \'{"canvas_length": 256, '
          '"max_denoising_steps": 48, "entropy_bound": 0.1}\'')
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests denoised concurrently (KV cache slots)")
    p.add_argument("--max-waiting", type=int, default=64, help="bound of the waiting queue (beyond: 503 + Retry-After)")
    add_kv_flags(p)
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="NAME",
                   help="Host-header names to serve besides IP addresses, localhost and --host (a defence against "
                        "DNS rebinding); '*' serves any")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /openapi.json "
                   "(turns /docs and /redoc off; /health and /metrics stay open)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use in 'model'")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", choices=["fp8"], default=None, help="fp8: FP8 weights, quantised as they load")
    p.add_argument("--language-model-only", action="store_true",
                   help="load the text model alone: the vision tower is not loaded or planned, image inputs get 400")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    p.add_argument("--no-memory-check", action="store_true", help="skip refusing configurations the plan says won't fit")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_mode_flags(p)
    add_parallel_flags(p)  # [parallel]
    add_media_flags(p)  # [vision]
    return p


def add_kv_flags(p: argparse.ArgumentParser) -> None:
    """The paged KV cache and the prefill budget (docs/kv_cache.md), with vLLM's flag names."""
    g = p.add_argument_group("KV cache and scheduling")
    g.add_argument("--block-size", type=int, default=64, help="positions per KV block of the full-attention layers")
    g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", dest="num_kv_blocks", type=int, default=None,
                   help="blocks in the KV pool (default: what the memory plan leaves room for, at most "
                        "--max-num-seqs full-length requests' worth)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of identical prompt prefixes between requests")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens encoded per engine step, all requests together (default 2048)")


def add_media_flags(p: argparse.ArgumentParser) -> None:
    """[vision] Where image parts of chat requests may come from (server/media.py)."""
    g = p.add_argument_group("images (vision checkpoints)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="accept file:// image URLs, only for files under DIR (default: none)")
    g.add_argument("--allow-remote-media", action="store_true", help="fetch http(s):// image URLs (default: refused)")
    g.add_argument("--max-images-per-request", type=int, default=8)
    g.add_argument("--max-image-pixels", type=int, default=50_000_000, help="width x height above which 400")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    shape = {"canvas_length": args.canvas_length, "max_denoising_steps": args.max_denoising_steps}
    defaults: dict[str, float] = {}
    if args.diffusion_config:
        try:
            dc = json.loads(args.diffusion_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--diffusion-config is not valid JSON ({e})") from None
        if not isinstance(dc, dict):
            raise ValueError("--diffusion-config must be a JSON object")
        unknown = sorted(set(dc) - set(_SHAPE_KEYS) - set(_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"--diffusion-config: unknown key(s) {unknown}; known: {list(_SHAPE_KEYS + _DEFAULT_KEYS)}")
        for k in _SHAPE_KEYS:
            if k in dc:
                if shape[k] is not None and shape[k] != dc[k]:
                    raise ValueError(f"--{k.replace('_', '-')} {shape[k]} contradicts --diffusion-config {k}={dc[k]}")
                shape[k] = dc[k]
        defaults = {k: dc[k] for k in _DEFAULT_KEYS if k in dc}
        bad = [k for k, v in defaults.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"--diffusion-config: {bad} must be numbers")
    return ServerConfig(
        model=args.model, host=args.host, port=args.port, allowed_hosts=tuple(args.allowed_hosts or ()),
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
        quantization=args.quantization, language_model_only=args.language_model_only,
        max_model_len=args.max_model_len, canvas_length=shape["canvas_length"],
        max_denoising_steps=shape["max_denoising_steps"], diffusion_defaults=tuple(sorted(defaults.items())),
        max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
        check_memory=not args.no_memory_check, log_level=args.log_level, media=media_policy(args),
        batch_invariant=args.batch_invariant, compile=args.compile, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        tp_timeout_s=args.tp_timeout)


def media_policy(args: argparse.Namespace):
    """[vision] The MediaPolicy of the media flags."""
    from .media import MediaPolicy

    return MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                       allow_remote_media=args.allow_remote_media, max_images_per_request=args.max_images_per_request,
                       max_image_pixels=args.max_image_pixels)


def build(config: ServerConfig):
    """Plan memory, load the model, return (llm, app). Raises before loading anything if the plan cannot fit."""
    from ..checkpoint import resolve
    from ..llm import LLM, default_model_path
    from . import memory

    path = resolve(config.model) if config.model is not None else default_model_path()
    if not path.is_dir():
        raise ValueError(f"the embedded default model is not installed ({path}): pass a MODEL folder or Hub id")
    blocks = config.num_kv_blocks
    if config.check_memory:
        plan = memory.check_checkpoint(path, dtype=config.dtype, device=config.device,
                                       quantization=config.quantization, max_num_seqs=config.max_num_seqs,
                                       language_model_only=config.language_model_only,
                                       max_model_len=config.max_model_len,
                                       canvas_length=config.canvas_length, max_waiting=config.max_waiting,
                                       batch_invariant=config.batch_invariant, block_size=config.block_size,
                                       num_kv_blocks=config.num_kv_blocks,
                                       max_num_batched_tokens=config.max_num_batched_tokens,
                                       tensor_parallel_size=config.tensor_parallel_size)
        blocks = plan.num_kv_blocks  # the pool the plan sized (or checked)
        log.info("memory plan (fits):\n%s", plan.describe())
    llm = LLM(path, dtype=config.dtype, device=config.device, max_num_seqs=config.max_num_seqs,
              max_model_len=config.max_model_len, canvas_length=config.canvas_length,
              max_denoising_steps=config.max_denoising_steps, batch_invariant=config.batch_invariant,
              compile=config.compile, quantization=config.quantization, block_size=config.block_size,
              num_kv_blocks=blocks, enable_prefix_caching=config.enable_prefix_caching,
              max_num_batched_tokens=config.max_num_batched_tokens,
              language_model_only=config.language_model_only,
              tensor_parallel_size=config.tensor_parallel_size, enable_expert_parallel=config.enable_expert_parallel,
              tp_timeout_s=config.tp_timeout_s)
    # Drafts are streamed as they happen; keeping every step's canvas per request would grow without bound.
    llm.engine.cfg = replace(llm.engine.cfg, keep_traces=False)
    if config.diffusion_defaults:
        # Server-wide denoising defaults: every request field left out falls back to these (then the checkpoint's).
        llm.engine.defaults = replace(llm.engine.defaults, **dict(config.diffusion_defaults))
    from .app import create_app

    return llm, create_app(llm, config)


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on a free loopback port, for tests, benchmarks and notebooks.

        with BackgroundServer(app) as srv:
            OpenAI(base_url=srv.url + "/v1", api_key=...)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="dgemma-uvicorn", daemon=True)
        self.host, self.port = host, port

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]  # port 0 asked the OS for a free one
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from .memory import MemoryPlanError

    try:
        config = config_from_args(args)
        check_device(config.device)
    except ValueError as e:
        print(f"dgemma serve: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = listen(config.host, config.port)  # before loading: a busy port fails in a second, not after a load
    except OSError as e:
        print(f"dgemma serve: error: {e}", file=sys.stderr)
        return 1
    with sock:
        try:
            _, app = build(config)
        except (MemoryPlanError, CheckpointError, ConfigError, ValueError) as e:
            print(f"dgemma serve: error: {e}", file=sys.stderr)
            return 2
        import uvicorn

        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"dgemma serve: serving {config.model_name} on http://{host}:{sock.getsockname()[1]} (playground at /)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level))

        def stop(message: str) -> None:  # [parallel] a lost rank ends the server
            app.state.fatal = message
            server.should_exit = True

        app.state.server.engine.on_fatal = stop
        server.run(sockets=[sock])
        if getattr(app.state, "fatal", None):  # [parallel] a tensor-parallel rank was lost: the server stopped
            print(f"dgemma serve: error: {app.state.fatal}", file=sys.stderr)
            return 1
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or an OSError that says in one line why not (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        hint = " (another process is listening there: stop it or pick another --port)" \
            if e.errno == errno.EADDRINUSE else ""
        why = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(f"cannot listen on {host}:{port}: {why}{hint}") from None


if __name__ == "__main__":
    sys.exit(main())
