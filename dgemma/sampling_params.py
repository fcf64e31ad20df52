"""Per-request sampling parameters and their resolution against the checkpoint's defaults.

`SamplingParams` is what a caller writes (vLLM-like names; `None` means "take it from the checkpoint's
`generation_config.json`"). `SamplingParams.resolve(defaults)` turns it into `DenoiseSettings`: the concrete numbers the
sampler and engine run with. Resolution order, per field: the request, then `defaults` (anything with attributes of
the same names, e.g. the loader's generation defaults), then `RELEASED_DEFAULTS` (the released checkpoint's values,
spec section 1.2 / decision 4).

Validation mirrors HF `DiffusionGemmaGenerationConfig.validate` (the oracle) with one deliberate relaxation:
`confidence_threshold=0` is allowed and means "never stop early" (the stop test is `mean entropy < threshold`), which
benchmarks use to force a fixed step count; HF rejects 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# MARK: validation helpers


def _is_int(x: Any) -> bool:
    # bool is an int subclass; `max_new_tokens=True` is a bug, not a 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_denoise_fields(obj: Any, *, resolved: bool) -> None:
    """Checks the fields shared by SamplingParams (optional) and DenoiseSettings (required)."""

    def present(name: str) -> bool:
        value = getattr(obj, name)
        if value is None and resolved:
            raise ValueError(f"{name} must be set after resolution (got None)")
        return value is not None

    if present("max_new_tokens") and (not _is_int(obj.max_new_tokens) or obj.max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an int >= 1 (got {obj.max_new_tokens!r})")
    if present("max_denoising_steps") and (not _is_int(obj.max_denoising_steps) or obj.max_denoising_steps < 1):
        raise ValueError(f"max_denoising_steps must be an int >= 1 (got {obj.max_denoising_steps!r})")
    if present("entropy_bound") and (not _is_real(obj.entropy_bound) or not obj.entropy_bound > 0):
        raise ValueError(f"entropy_bound must be a number > 0 (got {obj.entropy_bound!r})")
    for name in ("t_min", "t_max"):
        if present(name) and (not _is_real(getattr(obj, name)) or not getattr(obj, name) >= 0):
            raise ValueError(f"{name} must be a number >= 0 (got {getattr(obj, name)!r})")
    if obj.t_min is not None and obj.t_max is not None and not obj.t_max > obj.t_min:
        # Same rule as HF: the schedule anneals from t_max down to t_min, and t_min == t_max == 0 would divide by 0.
        raise ValueError(f"t_max must be > t_min (got t_min={obj.t_min!r}, t_max={obj.t_max!r})")
    if present("stability_threshold") and (not _is_int(obj.stability_threshold) or obj.stability_threshold < 0):
        raise ValueError(f"stability_threshold must be an int >= 0 (got {obj.stability_threshold!r})")
    if present("confidence_threshold") and (
        not _is_real(obj.confidence_threshold) or not obj.confidence_threshold >= 0
    ):
        raise ValueError(f"confidence_threshold must be a number >= 0 (got {obj.confidence_threshold!r})")


def _check_top_k_top_p(top_k: Any, top_p: Any) -> None:
    if not _is_int(top_k) or (top_k < 1 and top_k not in (0, -1)):
        raise ValueError(f"top_k must be an int >= 1, or 0 / -1 for off (got {top_k!r})")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], 1.0 meaning off (got {top_p!r})")


# MARK: resolved settings


@dataclass(frozen=True, kw_only=True)
class DenoiseSettings:
    """The concrete numbers one request runs with (no None left)."""

    max_new_tokens: int
    max_denoising_steps: int  # N: hard cap of decoder forwards per canvas
    entropy_bound: float  # acceptance: sum of accepted entropies minus their max <= bound
    t_min: float  # temperature at the last step (n = 1 gives t_min + (t_max - t_min) / N)
    t_max: float  # temperature at the first step (n = N)
    stability_threshold: int  # argmax must equal the previous k steps' argmax; 0 disables
    confidence_threshold: float  # mean entropy must be < this; 0 disables early stopping
    top_k: int = 0  # 0 = off (-1 is normalised to 0)
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        _check_denoise_fields(self, resolved=True)
        _check_top_k_top_p(self.top_k, self.top_p)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)


# Released google/diffusiongemma-26B-A4B-it generation_config.json (also HF's `_get_default_generation_params`).
RELEASED_DEFAULTS = DenoiseSettings(
    max_new_tokens=256,
    max_denoising_steps=48,
    entropy_bound=0.1,
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
)

_RESOLVED_FIELDS = tuple(f.name for f in fields(DenoiseSettings) if f.name not in ("top_k", "top_p"))


# MARK: request parameters


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """What one request asks for. Every Optional field left at None comes from the checkpoint."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    seed: int | None = None  # None: the engine picks one; the output then depends on that pick only
    stop: tuple[str, ...] = ()  # stop strings; a list or a single str is accepted and stored as a tuple
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids, on top of the checkpoint's EOS ids
    ignore_eos: bool = False
    top_k: int = 0  # 0 or -1 = off; masks the (soft-capped) logits before temperature and entropy, as vLLM does
    top_p: float = 1.0  # 1.0 = off; applied after top_k, on the untempered distribution
    trace: bool = False  # record the argmax canvas and accepted mask of every denoising step
    # Constrained decoding (at most one; docs/constrained.md): a JSON schema (dict or JSON text), a regex, a
    # choice among strings, a context-free grammar (Lark, as llguidance reads it), or an infilling template (fixed
    # text and holes, dgemma/template.py; its fixed spans at known positions are pinned on the canvas). The output
    # then always satisfies it, or ends with finish_reason "length".
    json_schema: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        # Normalise containers to tuples so the frozen object is really immutable and hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings (got {self.stop!r})")
        object.__setattr__(self, "stop", stop)
        stop_ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids must be ints >= 0 (got {self.stop_token_ids!r})")
        object.__setattr__(self, "stop_token_ids", stop_ids)

        _check_denoise_fields(self, resolved=False)
        _check_top_k_top_p(self.top_k, self.top_p)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63) or None (got {self.seed!r})")
        for name in ("ignore_eos", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (got {getattr(self, name)!r})")
        self._check_constraint()

    def _check_constraint(self) -> None:
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"choice must be a non-empty list of non-empty strings (got {self.choice!r})")
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar", "template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string (got {value!r})")
        given = [n for n in ("json_schema", "regex", "choice", "grammar", "template") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex, choice, grammar, template "
                             f"(got {', '.join(given)})")
        if given:
            if self.stop or self.stop_token_ids or self.ignore_eos:
                raise ValueError(f"{given[0]} cannot be combined with stop, stop_token_ids or ignore_eos: a "
                                 "constrained request ends where its constraint is complete")
            from .constraint import compile_grammar  # validates now, with llguidance's message
            object.__setattr__(self, "_grammar", compile_grammar(self.json_schema, self.regex, self.choice,
                                                                  self.grammar, self.template))

    @property
    def constraint_grammar(self) -> str | None:
        """The llguidance grammar of the request's constraint (None: unconstrained)."""
        return getattr(self, "_grammar", None)

    def resolve(self, defaults: Any = None) -> DenoiseSettings:
        """Fills every None from `defaults` (any object with same-named attributes), then RELEASED_DEFAULTS.

        A server should set max_new_tokens itself (request max_tokens, else the room left in max_model_len) before
        resolving: the checkpoint's 256 must not silently cap replies (spec decision 4)."""
        values = {}
        for name in _RESOLVED_FIELDS:
            value = getattr(self, name)
            if value is None and defaults is not None:
                value = getattr(defaults, name, None)
            if value is None:
                value = getattr(RELEASED_DEFAULTS, name)
            values[name] = value
        return DenoiseSettings(**values, top_k=self.top_k, top_p=self.top_p)
