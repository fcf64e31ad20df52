"""Tensor parallelism for inference: the process group, the collectives (counted), and how the model is sharded.

N ranks (torch.distributed: NCCL on GPUs, gloo on CPUs) each hold 1/N of the weights and run the same forward on the
same tokens. Per layer (model.py's `Layer.forward`):

- **attention**: each rank owns Hq/N query heads and the KV heads they read. When there are fewer KV heads than
  ranks (the released model's full layers have 2), a KV head is replicated on the N/Hkv ranks whose query heads
  share it, as vLLM does: the KV cache then holds one KV head per rank for those layers. q/k/v are column slices,
  `o_proj` a row slice; its partial output is summed by ONE all-reduce, before `post_attention_layernorm` (a norm
  of a sum cannot be split).
- **feed-forward**: the dense GeGLU MLP and every expert are column-parallel in gate/up (by intermediate rows)
  and row-parallel in down. Both branches end in their own norm (`post_feedforward_layernorm_1` / `_2`) before they
  are added, so their partials cannot be summed first: they are packed into one buffer and summed by ONE all-reduce.
  The router is replicated (it reads the replicated residual): every rank routes every token the same way.
- **vocabulary**: the tied embedding is split by vocabulary rows (padded to N equal shards). The lookup is
  vocab-parallel (each rank looks up the ids it owns, zeros elsewhere, one all-reduce): no rank holds the whole
  [V, H] matrix. The LM head computes each rank's logit columns and soft-caps them, and one all-gather hands the
  full logits to the sampler. The sampler's self-conditioning product softmax(z) @ E is computed per vocabulary
  shard and all-reduced (`vocab_matmul`).
- **replicated**: norms, router, layer scalars, the small self-conditioning input MLP, the sampler and its random
  draws (every rank draws from the same seeds, so a request's tokens do not depend on N), the vision tower.

Collectives go through `TensorParallel`, which counts the bytes each one moves (`CommStats`) and turns a failure
(a rank died, or a collective timed out) into a `CollectiveError` with one clear line. Rank 0 owns the scheduler;
parallel_engine.py makes the other ranks follow its steps.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

log = logging.getLogger("dgemma")

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this fails (a stuck or dead rank)
RENDEZVOUS_TIMEOUT_S = 300.0  # how long spawned ranks may take to join
PLAN_BYTES = 4096  # the fixed broadcast that carries a step plan (larger plans take a second one)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # experts placed across ranks instead of split (docs/parallel.md)
    timeout_s: float = DEFAULT_TIMEOUT_S  # collective timeout of the compute group

    def __post_init__(self) -> None:
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {n!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"the collective timeout must be positive, got {self.timeout_s!r}")


class CollectiveError(RuntimeError):
    """A tensor-parallel collective failed: a rank died, or one did not answer within the timeout."""


@dataclass
class CommStats:
    """Bytes each rank sends into collectives, by kind (counted from the tensors, not estimated)."""

    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def check_divisible(text: TextConfig, n: int, expert_parallel: bool = False) -> None:
    """Raise ValueError (one line) when `text` cannot be split over n ranks."""
    problems = []
    if text.num_attention_heads % n:
        problems.append(f"num_attention_heads {text.num_attention_heads}")
    for name in ("num_key_value_heads", "num_global_key_value_heads"):
        kv = getattr(text, name)
        if kv % n and n % kv:
            problems.append(f"{name} {kv} (neither a multiple nor a divisor of {n})")
    if text.intermediate_size % n:
        problems.append(f"intermediate_size {text.intermediate_size}")
    if expert_parallel:
        if text.num_experts % n:
            problems.append(f"num_experts {text.num_experts}")
    elif text.moe_intermediate_size % n:
        problems.append(f"moe_intermediate_size {text.moe_intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {n} does not divide this model: " + ", ".join(problems))


# MARK: which slice each rank holds


@dataclass(frozen=True)
class Shard:
    """A rank's slice of a parameter: the pieces `ranges` of dim `dim`, concatenated, then zero-padded to `pad_to`
    rows (the last vocabulary shard)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    pad_to: int | None = None
    full: tuple[int, ...] | None = None  # the whole tensor's shape (a checkpoint tensor must have it)

    def local_shape(self, full: torch.Size | tuple) -> tuple[int, ...]:
        shape = list(full)
        n = sum(b - a for a, b in self.ranges)
        shape[self.dim] = self.pad_to if self.pad_to is not None else n
        return tuple(shape)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        if self.pad_to is None or t.shape[self.dim] == self.pad_to:
            return t
        shape = list(t.shape)
        shape[self.dim] = self.pad_to - t.shape[self.dim]
        return torch.cat([t, t.new_zeros(shape)], self.dim)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The slice of a whole tensor (a copy)."""
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges]
        return self._pad(torch.cat(parts, self.dim) if len(parts) > 1 else parts[0].clone())

    def read(self, handle, name: str) -> torch.Tensor:
        """The slice read from an open safetensors file (`get_slice`): only these bytes are read."""
        sl = handle.get_slice(name)
        shape = tuple(sl.get_shape())
        if self.full is not None and shape != self.full:
            raise ValueError(f"shape {shape}, config.json implies {self.full}")
        ndim = len(shape)
        parts = []
        for a, b in self.ranges:
            index = tuple(slice(a, b) if d == self.dim else slice(None) for d in range(ndim))
            parts.append(sl[index])
        return self._pad(torch.cat(parts, self.dim) if len(parts) > 1 else parts[0])


@dataclass(frozen=True)
class Layout:
    """How a model is split over `size` ranks, as seen from `rank`: heads, intermediate rows, vocabulary rows."""

    rank: int
    size: int
    expert_parallel: bool = False

    def span(self, total: int) -> tuple[int, int]:
        """This rank's contiguous 1/size of `total` (total divisible by size)."""
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_heads(self, q_heads: int, kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this rank holds: its query heads' KV heads, replicated when kv < size."""
        if kv_heads >= self.size:
            per = kv_heads // self.size
            return self.rank * per, per
        return self.rank * kv_heads // self.size, 1

    def vocab(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, real rows, padded shard rows) of this rank's vocabulary shard."""
        per = -(-vocab_size // self.size)
        start = min(self.rank * per, vocab_size)
        return start, min(per, vocab_size - start), per

    def local_text(self, text: TextConfig) -> TextConfig:
        """The attention geometry one rank sees (its query and KV heads): what its KV cache holds."""
        return replace(text, num_attention_heads=text.num_attention_heads // self.size,
                       num_key_value_heads=self.kv_heads(text.num_attention_heads, text.num_key_value_heads)[1],
                       num_global_key_value_heads=self.kv_heads(text.num_attention_heads,
                                                                text.num_global_key_value_heads)[1])

    def expert_shards(self, t: TextConfig) -> tuple[Shard, Shard]:
        """(gate_up_proj [E, 2M, H], down_proj [E, H, M]) slices: whole experts with expert parallelism, else every
        expert's gate rows and up rows of this rank, and the matching columns of down."""
        if self.expert_parallel:
            e0, e1 = self.span(t.num_experts)
            return Shard(0, ((e0, e1),)), Shard(0, ((e0, e1),))
        m = t.moe_intermediate_size
        a, b = self.span(m)
        return Shard(1, ((a, b), (m + a, m + b))), Shard(2, ((a, b),))

    def shards(self, model) -> dict[str, Shard]:
        """Parameter name -> Shard for every split parameter of a DiffusionGemma (the rest are replicated)."""
        t = model.text
        out: dict[str, Shard] = {}
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}."
            d = t.layer_head_dim(i)
            q0, q1 = self.span(t.num_attention_heads)
            k0, nk = self.kv_heads(t.num_attention_heads, t.layer_kv_heads(i))
            out[p + "self_attn.q_proj.weight"] = Shard(0, ((q0 * d, q1 * d),))
            out[p + "self_attn.k_proj.weight"] = Shard(0, ((k0 * d, (k0 + nk) * d),))
            if layer.self_attn.v_proj is not None:
                out[p + "self_attn.v_proj.weight"] = Shard(0, ((k0 * d, (k0 + nk) * d),))
            out[p + "self_attn.o_proj.weight"] = Shard(1, ((q0 * d, q1 * d),))
            a, b = self.span(t.intermediate_size)
            out[p + "mlp.gate_proj.weight"] = Shard(0, ((a, b),))
            out[p + "mlp.up_proj.weight"] = Shard(0, ((a, b),))
            out[p + "mlp.down_proj.weight"] = Shard(1, ((a, b),))
            out[p + "experts.gate_up_proj"], out[p + "experts.down_proj"] = self.expert_shards(t)
        start, real, per = self.vocab(t.vocab_size)
        out["embed_tokens.weight"] = Shard(0, ((start, start + real),), pad_to=per)
        return out


def rank_parameters(cfg, size: int, expert_parallel: bool = False) -> int:
    """Parameters and buffers one rank of `size` holds (rank 0; every rank holds as many), counted on the meta
    device from the shard layout."""
    from .model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    check_divisible(model.text, size, expert_parallel)
    shards = Layout(0, size, expert_parallel).shards(model)
    total = 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        shard = shards.get(name)
        n = p.numel()
        if shard is not None:
            n = 1
            for x in shard.local_shape(p.shape):
                n *= x
        total += n
    return total


def shard_model(model, tp: "TensorParallel") -> dict[str, Shard]:
    """Split a DiffusionGemma in place for `tp`'s rank: on the meta device (before a sharded load) the parameters
    just take their local shapes; real parameters are sliced (a whole model in memory, e.g. in tests). Sets the
    local head counts and the hooks (`model.tp`, `layer.tp`). Returns the shards, for the loader."""
    layout = tp.layout
    check_divisible(model.text, layout.size, layout.expert_parallel)
    shards = layout.shards(model)
    for name, shard in shards.items():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        cur = mod._parameters[attr]
        shard = shards[name] = replace(shard, full=tuple(cur.shape))
        if cur.is_meta:
            new = torch.empty(shard.local_shape(cur.shape), dtype=cur.dtype, device="meta")
        else:
            new = shard.take(cur.detach())
        mod._parameters[attr] = nn.Parameter(new, requires_grad=False)
    local = layout.local_text(model.text)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.heads, attn.kv_heads = local.num_attention_heads, local.layer_kv_heads(i)
        attn.fused = None  # rebuilt from the local slices
        layer.mlp.fused = None
        layer.tp = tp
        if layout.expert_parallel:
            e0, e1 = layout.span(model.text.num_experts)
            layer.experts.expert_range = (e0, e1)
    model.tp = tp
    model.cache_config = local
    return shards


# MARK: the process group and its collectives


_current: "TensorParallel | None" = None
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name when present


def current() -> "TensorParallel | None":
    """The tensor-parallel group of this process, if one is set up."""
    return _current


class TensorParallel:
    """This rank's view of the tensor-parallel group: rank, size, the compute group (NCCL or gloo, with the
    collective timeout) and a gloo control group for the step plan (long timeout: an idle leader is no fault; a
    dead one is still seen at once, by its closed connections). Every collective counts its bytes in `stats`."""

    def __init__(self, rank: int, size: int, device: torch.device, expert_parallel: bool = False,
                 control=None, group=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.size, self.device = rank, size, torch.device(device)
        self.timeout_s = timeout_s
        self.layout = Layout(rank, size, expert_parallel)
        self.group, self.control = group, control
        self.stats = CommStats()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------------------------
    def _fail(self, what: str, e: Exception) -> "CollectiveError":
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CollectiveError(f"tensor-parallel {what} failed on rank {self.rank} of {self.size} (a rank died or "
                               f"did not answer in time): {msg}")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the ranks, in place; returns t."""
        self.stats.add("all_reduce", t.numel() * t.element_size())
        try:
            dist.all_reduce(t, group=self.group)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("all_reduce", e) from None
        return t

    def all_reduce_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum two same-shaped tensors over the ranks with one collective (packed into one buffer)."""
        both = self.all_reduce(torch.stack([a, b.to(a.dtype)]))
        return both[0], both[1]

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[..., shard] per rank -> [..., vocab_size] on every rank (shards in rank order, padding dropped)."""
        local = local.contiguous()
        self.stats.add("all_gather", local.numel() * local.element_size())
        flat = local.view(-1)
        out = flat.new_empty(self.size * flat.numel())
        try:
            _all_gather(out, flat, group=self.group)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("all_gather", e) from None
        full = out.view(self.size, *local.shape).movedim(0, -2).reshape(*local.shape[:-1], self.size * local.shape[-1])
        return full if full.shape[-1] == vocab_size else full[..., :vocab_size].contiguous()

    def broadcast_plan(self, plan: bytes | None) -> bytes:
        """The leader's step plan (bytes: parallel_engine encodes it as JSON, tensors as safetensors, never a
        pickle) to every rank, on the control group: one fixed 4 KiB broadcast (a second one when the plan is larger).
        The leader waits at most the collective timeout (a stuck follower is an error); followers wait for as long as
        the leader idles."""
        head = torch.zeros(PLAN_BYTES, dtype=torch.uint8)
        if self.leader:
            data = plan
            head[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
            if len(data) <= PLAN_BYTES - 8:
                head[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self._broadcast(head)
        n = int.from_bytes(bytes(head[:8].tolist()), "little")
        body = head[8:8 + n]
        if n > PLAN_BYTES - 8:
            body = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader else \
                torch.empty(n, dtype=torch.uint8)
            self._broadcast(body)
        return plan if self.leader else body.numpy().tobytes()

    def _broadcast(self, t: torch.Tensor) -> None:
        self.stats.add("plan_broadcast", t.numel())
        try:
            work = dist.broadcast(t, src=0, group=self.control, async_op=True)
            if self.leader:
                work.wait(datetime.timedelta(seconds=self.timeout_s))
            else:
                work.wait()
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("step-plan broadcast", e) from None

    # -- vocabulary-parallel pieces ----------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Embedding lookup over a vocabulary shard: ids this rank owns are looked up, the others give zeros, and
        one all-reduce completes every row (exact: each row is one real vector plus zeros)."""
        start, real, _ = self.layout.vocab(vocab_size)
        local = ids - start
        outside = (local < 0) | (local >= real)
        out = F.embedding(local.masked_fill(outside, 0), shard).masked_fill_(outside[..., None], 0)
        return self.all_reduce(out)

    def vocab_matmul(self, probs: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """probs [..., V] @ E [V, H] with E split by vocabulary rows: each rank's partial product, all-reduced."""
        start, real, _ = self.layout.vocab(probs.shape[-1])
        part = torch.matmul(probs[..., start:start + real], shard[:real])
        return self.all_reduce(part)

    def ready(self) -> None:
        """Wait (on the patient control group) until every rank has loaded its shard, before the first collective
        that the timeout guards."""
        try:
            dist.barrier(group=self.control)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("start-up barrier", e) from None

    def close(self) -> None:
        global _current
        if _current is self:
            _current = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group (dead peer) may refuse to be torn down cleanly
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(cfg: ParallelConfig, rank: int, device: str | torch.device, init_method: str | None = None) -> TensorParallel:
    """Join (or create) the default process group as `rank` of `cfg.tensor_parallel_size` and return this rank's
    TensorParallel. `init_method` None: torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
    global _current
    n = cfg.tensor_parallel_size
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    # Ranks may take a while to start (imports, loading): the rendezvous and the group's set-up wait longer than a
    # collective may; the collective timeout is set once every rank is there.
    patient = datetime.timedelta(seconds=max(cfg.timeout_s, RENDEZVOUS_TIMEOUT_S))
    kw = {}
    if init_method is not None:
        host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
        kw["store"] = dist.TCPStore(host, int(port), n, is_master=rank == 0, timeout=patient)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    dist.init_process_group(backend_for(dev), rank=rank, world_size=n, timeout=patient if set_timeout else timeout,
                            **kw)
    # The control group carries the step plan (Python objects) on the CPU; it may idle for as long as the leader
    # has no work, so its timeout is long: a dead leader is still noticed at once (closed connections).
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    if set_timeout is not None:
        set_timeout(timeout)
    _current = TensorParallel(rank, n, dev, cfg.enable_expert_parallel, control=control, group=None,
                              timeout_s=cfg.timeout_s)
    return _current


def torchrun_rank(n: int) -> int | None:
    """This process's rank when torchrun launched it with WORLD_SIZE == n, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != n:
        raise ValueError(f"torchrun started {world} processes but --tensor-parallel-size is {n}")
    return int(os.environ["RANK"])
