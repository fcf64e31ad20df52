"""`dgemma serve`: an OpenAI-compatible HTTP server over the block-diffusion engine.

Modules:
    cli.py           argparse `main(argv)` for `dgemma serve`; builds a `ServerConfig`, plans memory, loads, runs uvicorn
    memory.py        the start-up memory plan (refuses what cannot fit, before allocating anything)
    async_engine.py  the engine loop: one background thread owns the synchronous `Engine`; asyncio talks to it
    protocol.py      pydantic request/response models and the OpenAI -> `SamplingParams` mapping
    app.py           the FastAPI app factory: endpoints, auth, errors, SSE streaming, the playground page
    prompts.py       prompt text to ids: the character bound, tokenising off the GIL, chat template variables
    security.py      the Host check (DNS rebinding) and JSON-only bodies (no cross-site "simple" requests)
    schema.py        the OpenAPI description: request bodies, responses, errors (what the fuzz test checks)
    metrics.py       Prometheus text-format metrics (plain formatting, no prometheus_client dependency)
    media.py         image parts of chat requests: data:/file:/http(s) URL policy, bad-image 400s
    static/          the playground page served at `GET /`

`ServerConfig` lives here so that every module (and a caller embedding the server) can import it without pulling in
FastAPI or torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Everything `dgemma serve` was asked for. None means "take it from the checkpoint"."""

    model: str | None = None  # checkpoint folder or hub name; None: the embedded default model
    host: str = "127.0.0.1"  # loopback by default: exposing a server is an explicit choice
    # Host-header names served besides IP literals, localhost and `host` (DNS-rebinding defence); "*": any
    allowed_hosts: tuple[str, ...] = ()
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # first one is echoed in responses; empty: derived from `model`
    api_key: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    quantization: str | None = None  # "fp8": weights quantised as they load (fp8.py)
    language_model_only: bool = False  # vLLM's --language-model-only: no vision tower loaded, images refused (400)
    max_model_len: int | None = None
    canvas_length: int | None = None
    max_denoising_steps: int | None = None
    # Other denoising defaults from --diffusion-config (entropy_bound, t_min, ...), as sorted (name, value) pairs so
    # the dataclass stays hashable and frozen.
    diffusion_defaults: tuple[tuple[str, float], ...] = ()
    max_num_seqs: int = 8
    max_waiting: int = 64  # bounded waiting queue: beyond it requests get 503 + Retry-After
    max_body_bytes: int = 4 * 2**20  # 413 beyond this
    retry_after_s: int = 1
    check_memory: bool = True
    log_level: str = "info"
    media: object = None  # [vision] server.media.MediaPolicy: where images may come from, limits; None = defaults
    batch_invariant: bool | None = None  # engine mode (docs/fast_step.md); None: exact on the CPU, fast elsewhere
    compile: bool | None = None  # torch.compile the fast step; None: on CUDA
    block_size: int = 64  # paged KV cache (docs/kv_cache.md)
    num_kv_blocks: int | None = None  # None: as many as the memory plan leaves room for (at most max_num_seqs
    # full-length requests' worth)
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int | None = None  # prompt tokens per step (None: one 2,048-token chunk)
    tensor_parallel_size: int = 1  # [parallel] ranks the model is split over (docs/parallel.md)
    enable_expert_parallel: bool = False  # [parallel] whole experts per rank
    tp_timeout_s: float | None = None  # [parallel] collective timeout (None: parallel.DEFAULT_TIMEOUT_S)

    def __post_init__(self) -> None:
        for name in ("port", "max_num_seqs", "max_waiting", "max_body_bytes", "retry_after_s", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "canvas_length", "max_denoising_steps", "num_kv_blocks",
                     "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def model_name(self) -> str:
        """The name responses carry: the first --served-model-name, else the MODEL argument, else the default's."""
        if self.served_model_names:
            return self.served_model_names[0]
        return self.model if self.model is not None else "dgemma-shakespeare"


__all__ = ["ServerConfig"]
