"""Rank 0 schedules, the other ranks follow: the engine side of tensor parallelism (parallel.py shards the model).

Every rank runs the same deterministic `Engine` over its shard. Rank 0 (`LeaderEngine`) owns the scheduler, the API
and the HTTP server: it takes requests and aborts, gives every request its seed and id, and at each `step()` first
broadcasts the commands that arrived since the last step (`encode_plan`: JSON, image tensors as safetensors, never a
pickle; one fixed-size broadcast on a gloo control group), then steps. The other ranks (`follow`) receive that plan,
apply the same commands in the same order, and step too. Admission, slot choice, canvas starts, sampling and commits
are functions of those commands and of the step's results, which are the same on every rank (the logits are
all-gathered, so every rank samples the same tokens from the same seeds): the ranks stay in lockstep without any
other message.

How the ranks start (`start`):
- under torchrun (RANK and WORLD_SIZE set), each process is one rank; in every process `LLM(...,
  tensor_parallel_size=N)` joins the group, and on ranks other than 0 it follows rank 0 until rank 0 closes, then
  raises SystemExit(0): only rank 0 returns from it;
- otherwise rank 0 spawns the N - 1 other ranks itself (torch.multiprocessing, 'spawn'; daemon processes that
  load their own shard), so `dgemma generate/serve --tensor-parallel-size N` and `LLM(tensor_parallel_size=N)`
  need no launcher.

A rank that dies, or a collective that waits past the timeout (`--tp-timeout`), raises `parallel.CollectiveError`
on the others: the leader fails its requests and exits non-zero, followers print one line and exit.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import sys
from dataclasses import fields, replace

import torch

from . import parallel
from .engine import Engine
from .parallel import CollectiveError, ParallelConfig, TensorParallel
from .config import GenerationConfig
from .sampling_params import SamplingParams
from .vision_prompt import PromptImages

log = logging.getLogger("dgemma")
SPAWNED = "DGEMMA_TP_RANK"  # set in the processes `start` spawns: "RANK@tcp://HOST:PORT"


class LeaderEngine(Engine):
    """The engine of rank 0: an `Engine` whose commands are replayed by the followers (module doc)."""

    def __init__(self, *args, tp: TensorParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp = tp
        self._pending: list[tuple] = []
        self.closed = self.failed = False

    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None,
                    images=None) -> str:
        params = params or SamplingParams()
        if params.seed is None:  # the leader draws the seed, so that every rank uses the same one
            params = replace(params, seed=self._seed_rng.randrange(2**63))
        rid = super().add_request(prompt_ids, params, request_id, images=images)
        # the defaults travel with the request: a server may change them on the leader (--diffusion-config)
        self._pending.append(("add", [int(t) for t in prompt_ids], params, rid, images, self.defaults))
        return rid

    def abort(self, request_id: str) -> bool:
        found = super().abort(request_id)
        if found:
            self._pending.append(("abort", request_id))
        return found

    def fail(self, request_id: str, failure):
        """End a request with an error here, and have the followers drop it too (a server's fallback when an abort
        fails): otherwise their slots would drift from the leader's."""
        event = super().fail(request_id, failure)
        if event is not None:
            self._pending.append(("abort", request_id))
        return event

    def step(self):
        if self.closed:
            raise CollectiveError("the tensor-parallel group is closed")
        plan, self._pending = self._pending, []
        try:
            self.tp.broadcast_plan(encode_plan(plan))
            return super().step()
        except CollectiveError:
            self.failed = True
            raise

    def close(self) -> None:
        """Tell the followers to stop (they exit), once. After a failure nothing is sent: they exit on their own."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            try:
                self.tp.broadcast_plan(encode_plan([("stop",)]))
            except CollectiveError as e:
                log.warning("%s", e)


_TUPLES = {"stop", "stop_token_ids", "choice", "eos_token_ids"}  # dataclass fields that JSON turns into lists


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _dataclass(cls, d: dict):
    return cls(**{k: tuple(v) if k in _TUPLES and isinstance(v, list) else v for k, v in d.items()})


def _images(images: PromptImages | None) -> dict | None:
    """[vision] A prompt's images: tensors as one safetensors blob (base64), the rest as JSON."""
    if images is None:
        return None
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in _fields(images).items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in _fields(images).items() if not isinstance(v, torch.Tensor)}
    return {"tensors": base64.b64encode(save(tensors)).decode("ascii"), **rest}


def _unimages(d: dict | None) -> PromptImages | None:
    if d is None:
        return None
    from safetensors.torch import load
    d = dict(d)
    tensors = load(base64.b64decode(d.pop("tensors")))
    return PromptImages(**d, **tensors)


def encode_plan(plan: list) -> bytes:
    """A step plan (commands: ("add", prompt, params, id, images, defaults), ("abort", id), ("stop",)) as bytes:
    JSON, with image tensors in safetensors. Only these types travel; nothing is unpickled on the other side."""
    out = []
    for cmd in plan:
        if cmd[0] == "add":
            _, prompt, params, rid, images, defaults = cmd
            if defaults is not None and not isinstance(defaults, GenerationConfig):
                raise TypeError(f"engine defaults must be a GenerationConfig to travel, not {type(defaults).__name__}")
            out.append({"op": "add", "prompt": prompt, "params": _fields(params), "id": rid,
                        "images": _images(images), "defaults": None if defaults is None else _fields(defaults)})
        else:
            out.append({"op": cmd[0], "args": list(cmd[1:])})
    return json.dumps(out).encode()


def decode_plan(data: bytes) -> list:
    """The commands `encode_plan` wrote."""
    cmds = []
    for c in json.loads(data):
        if c["op"] == "add":
            defaults = None if c["defaults"] is None else _dataclass(GenerationConfig, c["defaults"])
            cmds.append(("add", c["prompt"], _dataclass(SamplingParams, c["params"]), c["id"],
                         _unimages(c["images"]), defaults))
        else:
            cmds.append((c["op"], *c["args"]))
    return cmds


def follow(engine: Engine, tp: TensorParallel) -> None:
    """A follower rank's loop: apply the leader's commands, step, until the leader says stop."""
    while True:
        for cmd in decode_plan(tp.broadcast_plan(None)):
            if cmd[0] == "stop":
                return
            if cmd[0] == "add":
                _, prompt, params, rid, images, engine.defaults = cmd
                engine.add_request(prompt, params, rid, images=images)
            elif cmd[0] == "abort":
                engine.abort(cmd[1])
        engine.step()


def start(cfg: ParallelConfig, device: str, llm_kwargs: dict) -> TensorParallel:
    """Join the tensor-parallel group: as a torchrun rank, or as rank 0 spawning the other ranks, each of which
    builds `LLM(**llm_kwargs)` (module doc)."""
    spawned = os.environ.get(SPAWNED)
    if spawned is not None:  # a rank that `start` spawned: its rank and rendezvous address
        rank, _, method = spawned.partition("@")
        return parallel.init(cfg, int(rank), device, method)
    rank = parallel.torchrun_rank(cfg.tensor_parallel_size)
    if rank is not None:
        return parallel.init(cfg, rank, device)
    import torch.multiprocessing as mp

    port = parallel.free_port()
    ctx = mp.get_context("spawn")
    workers = []
    for r in range(1, cfg.tensor_parallel_size):
        p = ctx.Process(target=_worker, args=(r, cfg.tensor_parallel_size, port, torch.get_num_threads(), llm_kwargs),
                        daemon=True, name=f"dgemma-tp{r}")
        p.start()
        workers.append(p)
    try:
        tp = parallel.init(cfg, 0, device, f"tcp://127.0.0.1:{port}")
    except BaseException:
        for p in workers:
            p.terminate()
        raise
    tp.workers = workers
    return tp


def _worker(rank: int, size: int, port: int, threads: int, llm_kwargs: dict) -> None:
    """A spawned rank: its rank and rendezvous in the environment, then `LLM(...)`, which follows rank 0 and exits."""
    os.environ.update({SPAWNED: f"{rank}@tcp://127.0.0.1:{port}", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="dgemma: %(message)s")
    from .llm import LLM

    try:
        LLM(**llm_kwargs)
    except SystemExit as e:
        sys.exit(e.code)
    except CollectiveError as e:
        print(f"dgemma: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_follower(engine: Engine, tp: TensorParallel) -> "NoReturn":  # noqa: F821
    """What `LLM(...)` does on a rank other than 0: follow the leader, then leave the process."""
    try:
        follow(engine, tp)
    except CollectiveError as e:
        print(f"dgemma: {e}", file=sys.stderr, flush=True)
        tp.close()
        raise SystemExit(1) from None
    tp.close()
    raise SystemExit(0)


def close(engine: Engine, tp: TensorParallel) -> None:
    """Rank 0's shutdown: stop the followers, wait for spawned ones, leave the group."""
    if isinstance(engine, LeaderEngine):
        engine.close()
    for p in getattr(tp, "workers", []):
        p.join(10 if not getattr(engine, "failed", False) else 2)
        if p.is_alive():
            p.terminate()
    tp.close()


def register_exit(fn) -> None:
    atexit.register(fn)
