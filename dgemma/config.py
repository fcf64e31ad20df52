"""Model and generation configuration: `config.json` and `generation_config.json` as frozen dataclasses.

Reads the Hugging Face `diffusion_gemma` layout (a top-level config with `text_config` and `canvas_length`) and the
checkpoint's denoising defaults. Every check names the file, the field and what was expected, so a malformed or
foreign checkpoint fails with one clear line instead of a shape error deep in the model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("dgemma")

SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ROPE = {"default", "proportional"}

# The released 26B-A4B denoising defaults (spec section 3), used where a checkpoint has no generation_config.json.
RELEASED_GENERATION = dict(
    max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005,
)


class ConfigError(ValueError):
    """A configuration file is missing a field, has a wrong value, or describes another architecture."""


def _where(source: str, name: str) -> str:
    return f"{source}: field '{name}'"


def _check(cond: bool, source: str, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{_where(source, name)} must be {expected}, got {got!r}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. `proportional` rotates only `partial_rotary_factor` of the frequency
    slots, with exponents over the *full* head size; the remaining slots get frequency 0 (identity)."""

    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """The Gemma-4 MoE text stack shared by the encoder and the decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]
    max_position_embeddings: int = 262_144
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    attention_k_eq_v: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    source: str = field(default="config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.source + " text_config"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                     "num_experts", "top_k_experts", "moe_intermediate_size", "sliding_window",
                     "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, s, name, "a positive integer", v)
        _check(self.top_k_experts <= self.num_experts, s, "top_k_experts", f"<= num_experts ({self.num_experts})",
               self.top_k_experts)
        for name, kv in (("num_key_value_heads", self.num_key_value_heads),
                         ("num_global_key_value_heads", self.num_global_key_value_heads)):
            _check(self.num_attention_heads % kv == 0, s, name,
                   f"a divisor of num_attention_heads ({self.num_attention_heads})", kv)
        _check(len(self.layer_types) == self.num_hidden_layers, s, "layer_types",
               f"a list of {self.num_hidden_layers} entries (num_hidden_layers)", list(self.layer_types))
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        _check(not bad, s, "layer_types", f"only '{SLIDING}' or '{FULL}'", bad)
        for lt in set(self.layer_types):
            _check(lt in self.rope, s, "rope_parameters", f"an entry for '{lt}'", sorted(self.rope))
            r = self.rope[lt]
            _check(r.rope_type in SUPPORTED_ROPE, s, f"rope_parameters.{lt}.rope_type",
                   f"one of {sorted(SUPPORTED_ROPE)}", r.rope_type)
            _check(r.theta > 0, s, f"rope_parameters.{lt}.rope_theta", "positive", r.theta)
            _check(0 < r.partial_rotary_factor <= 1, s, f"rope_parameters.{lt}.partial_rotary_factor",
                   "in (0, 1]", r.partial_rotary_factor)
            _check(r.rope_type == "proportional" or r.partial_rotary_factor == 1.0, s,
                   f"rope_parameters.{lt}.partial_rotary_factor", "1.0 for rope_type 'default'",
                   r.partial_rotary_factor)
            _check(r.factor > 0 and (r.rope_type == "proportional" or r.factor == 1.0), s,
                   f"rope_parameters.{lt}.factor", "1.0 for rope_type 'default' (transformers ignores it there)",
                   r.factor)
        _check(self.hidden_activation == "gelu_pytorch_tanh", s, "hidden_activation", "'gelu_pytorch_tanh'",
               self.hidden_activation)
        _check(self.head_dim % 2 == 0 and self.global_head_dim % 2 == 0, s, "head_dim", "even", self.head_dim)
        _check(self.final_logit_softcapping is None or self.final_logit_softcapping > 0, s,
               "final_logit_softcapping", "positive or null", self.final_logit_softcapping)
        _check(self.attention_k_eq_v, s, "attention_k_eq_v",
               "true (full layers of this architecture have no v_proj)", self.attention_k_eq_v)

    # -- per-layer geometry ------------------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def num_parameters(self) -> int:
        """Parameter count of the text stack (weights stored once; self-conditioning included)."""
        h, n = self.hidden_size, 0
        for i in range(self.num_hidden_layers):
            d, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            n += h * self.num_attention_heads * d * 2 + h * kv * d * (2 if self.is_sliding(i) else 1) + 2 * d
            n += 3 * h * self.intermediate_size + 7 * h
            n += self.num_experts * (3 * h * self.moe_intermediate_size + 1) + h * self.num_experts + h
        return n + self.vocab_size * h + h + 3 * h * self.intermediate_size + h


@dataclass(frozen=True)
class ModelConfig:
    """Top-level `diffusion_gemma` config: the text stack, the canvas length and the stop tokens."""

    text: TextConfig
    canvas_length: int = 256
    eos_token_ids: tuple[int, ...] = (1,)
    has_vision: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.canvas_length, int) and self.canvas_length > 0, self.source, "canvas_length",
               "a positive integer", self.canvas_length)
        for t in self.eos_token_ids:
            _check(0 <= t < self.text.vocab_size, self.source, "eos_token_id",
                   f"token ids in [0, {self.text.vocab_size})", list(self.eos_token_ids))

    # -- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt != "diffusion_gemma":
            raise ConfigError(
                f"{source}: field 'model_type' must be 'diffusion_gemma' (a DiffusionGemma checkpoint), got {mt!r}"
                + (" - this looks like another architecture" if mt else ""))
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError(f"{source}: field 'text_config' is missing or not an object")
        text = _text_from_dict(d["text_config"], source)
        eos = d.get("eos_token_id", d["text_config"].get("eos_token_id", 1))
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(text=text, canvas_length=d.get("canvas_length", 256), eos_token_ids=eos,
                   has_vision=d.get("vision_config") is not None, raw=d, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(_read_json(Path(path)), source=str(path))

    # -- writing -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The HF `config.json` layout. Fields dgemma does not model (vision, token ids) are carried over."""
        t = self.text
        text = {
            "model_type": "diffusion_gemma_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "global_head_dim": t.global_head_dim,
            "num_global_key_value_heads": t.num_global_key_value_heads, "num_experts": t.num_experts,
            "top_k_experts": t.top_k_experts, "moe_intermediate_size": t.moe_intermediate_size,
            "hidden_activation": t.hidden_activation, "sliding_window": t.sliding_window,
            "layer_types": list(t.layer_types), "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {lt: _rope_to_dict(r) for lt, r in t.rope.items()},
            "final_logit_softcapping": t.final_logit_softcapping, "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": False, "pad_token_id": t.pad_token_id, "eos_token_id": t.eos_token_id,
            "bos_token_id": t.bos_token_id, "tie_word_embeddings": True,
            # how image tokens attend in the encoder ("vision": both ways within an image; vision.py): kept as read
            "use_bidirectional_attention": (self.raw.get("text_config") or {}).get("use_bidirectional_attention",
                                                                                   "vision"),
        }
        out = {k: v for k, v in self.raw.items() if k not in ("text_config", "per_layer_config")}
        out.update({
            "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length, "tie_word_embeddings": True, "text_config": text,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
        })
        if "vision_config" not in out:
            # transformers always builds a vision tower; a tiny one keeps a text-only checkpoint cheap to load there.
            out["vision_config"] = TINY_VISION_CONFIG
        return out

    def with_canvas_length(self, n: int) -> "ModelConfig":
        return replace(self, canvas_length=n)


# transformers instantiates a vision tower for every DiffusionGemma config. For dgemma's own text-only models we
# declare the smallest one it accepts (its weights are simply absent: transformers initialises them, unused).
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "patch_size": 16, "pooling_kernel_size": 3,
    "position_embedding_size": 16,
}


def _rope_to_dict(r: RopeConfig) -> dict:
    d: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type == "proportional":
        d["partial_rotary_factor"] = r.partial_rotary_factor
    if r.factor != 1.0:
        d["factor"] = r.factor
    return d


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _full_layer_geometry(d: dict, layer_types: list[str], s: str) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of the full-attention layers.

    Stored two ways: the release's `global_head_dim` / `num_global_key_value_heads`, or transformers' own
    `per_layer_config` override map (what `save_pretrained` writes). That map holds only the fields that differ from
    the base config (with `global_head_dim == head_dim` an entry has no `head_dim`, and it may be `{}`), so a missing
    field means the base value. Without a map, transformers defaults `global_head_dim` to 512 and the full layers'
    kv heads to the base count."""
    if d.get("per_layer_config") is None:
        gdim = d.get("global_head_dim", 512)
        gkv = d.get("num_global_key_value_heads")
        return gdim, gkv if gkv is not None else d["num_key_value_heads"]
    plc = d["per_layer_config"]
    if not isinstance(plc, dict):
        raise ConfigError(f"{_where(s, 'per_layer_config')} must be an object keyed by layer index, got {plc!r}")
    seen = {}
    for idx, lt in enumerate(layer_types):
        o = plc.get(str(idx)) or plc.get(idx) or {}
        if not isinstance(o, dict):
            raise ConfigError(f"{_where(s, f'per_layer_config.{idx}')} must be an object, got {o!r}")
        unknown = sorted(set(o) - {"head_dim", "num_key_value_heads"})
        if unknown or (lt == SLIDING and o):
            raise ConfigError(f"{_where(s, f'per_layer_config.{idx}')}: dgemma supports only head_dim and "
                              f"num_key_value_heads overrides of full-attention layers, got {o!r} for a {lt} layer")
        if lt == FULL:
            seen[idx] = (o.get("head_dim", d["head_dim"]), o.get("num_key_value_heads", d["num_key_value_heads"]))
    if len(set(seen.values())) > 1:
        raise ConfigError(f"{_where(s, 'per_layer_config')}: every full-attention layer must have the same geometry, "
                          f"got {seen}")
    return next(iter(seen.values()), (d.get("global_head_dim", d["head_dim"]),
                                      d.get("num_global_key_value_heads", d["num_key_value_heads"])))


def _text_from_dict(d: dict, source: str) -> TextConfig:
    s = source + " text_config"
    if d.get("model_type", "diffusion_gemma_text") not in ("diffusion_gemma_text", "gemma4_text"):
        raise ConfigError(f"{_where(s, 'model_type')} must be 'diffusion_gemma_text', got {d.get('model_type')!r}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size",
                "sliding_window")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ConfigError(f"{s}: missing required field(s) {missing}")
    n = d["num_hidden_layers"]
    layer_types = d.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    gdim, gkv = _full_layer_geometry(d, layer_types, s)
    rp = d.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    if not isinstance(rp, dict):
        raise ConfigError(f"{_where(s, 'rope_parameters')} must be an object keyed by layer type, got {rp!r}")
    rope = {}
    for lt, r in rp.items():
        if not isinstance(r, dict) or "rope_theta" not in r:
            raise ConfigError(f"{_where(s, f'rope_parameters.{lt}')} must be an object with 'rope_theta', got {r!r}")
        kind = r.get("rope_type", "default")
        factor = float(r.get("factor", 1.0))
        if kind == "default" and factor != 1.0:
            # transformers' default RoPE never reads `factor` (only its scaled types do): ignore it as it does.
            log.warning("%s: rope_parameters.%s.factor=%s is ignored for rope_type 'default' (as transformers "
                        "does)", s, lt, factor)
            factor = 1.0
        rope[lt] = RopeConfig(rope_type=kind, theta=float(r["rope_theta"]),
                              partial_rotary_factor=float(r.get("partial_rotary_factor", 1.0)), factor=factor)
    eos = d.get("eos_token_id", 1)
    return TextConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=n, num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
        global_head_dim=gdim, num_global_key_value_heads=gkv,
        num_experts=d["num_experts"], top_k_experts=d["top_k_experts"],
        moe_intermediate_size=d["moe_intermediate_size"], sliding_window=d["sliding_window"],
        layer_types=tuple(layer_types), rope=rope,
        max_position_embeddings=d.get("max_position_embeddings", 262_144),
        hidden_activation=d.get("hidden_activation", "gelu_pytorch_tanh"),
        final_logit_softcapping=d.get("final_logit_softcapping", 30.0), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        attention_k_eq_v=d.get("attention_k_eq_v", True), pad_token_id=d.get("pad_token_id", 0) or 0,
        eos_token_id=eos[0] if isinstance(eos, list) else eos, bos_token_id=d.get("bos_token_id", 2) or 2,
        source=source,
    )


@dataclass(frozen=True)
class GenerationConfig:
    """Denoising defaults of a checkpoint (`generation_config.json`), released values where absent."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    source: str = field(default="generation_config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.source
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, s, "max_new_tokens",
               "a positive integer", self.max_new_tokens)
        _check(isinstance(self.max_denoising_steps, int) and self.max_denoising_steps > 0, s,
               "max_denoising_steps", "a positive integer", self.max_denoising_steps)
        _check(self.entropy_bound >= 0, s, "sampler_config.entropy_bound", ">= 0", self.entropy_bound)
        _check(0 < self.t_min <= self.t_max, s, "t_min/t_max", "0 < t_min <= t_max", (self.t_min, self.t_max))
        _check(isinstance(self.stability_threshold, int) and self.stability_threshold >= 0, s,
               "stability_threshold", "an integer >= 0", self.stability_threshold)
        _check(self.confidence_threshold >= 0, s, "confidence_threshold", ">= 0", self.confidence_threshold)

    @classmethod
    def from_dict(cls, d: dict, source: str = "generation_config.json") -> "GenerationConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        vals = dict(RELEASED_GENERATION)
        for k in vals:
            if d.get(k) is not None:
                vals[k] = d[k]
        sc = d.get("sampler_config") or {}
        if not isinstance(sc, dict):
            raise ConfigError(f"{_where(source, 'sampler_config')} must be an object, got {sc!r}")
        if sc.get("_cls_name", "EntropyBoundSamplerConfig") != "EntropyBoundSamplerConfig":
            raise ConfigError(f"{_where(source, 'sampler_config._cls_name')} must be 'EntropyBoundSamplerConfig',"
                              f" got {sc.get('_cls_name')!r}")
        if sc.get("entropy_bound") is not None:
            vals["entropy_bound"] = sc["entropy_bound"]
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(**vals, eos_token_ids=eos, pad_token_id=d.get("pad_token_id") or 0, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        path = Path(path)
        if not path.exists():
            return cls(source=str(path))
        return cls.from_dict(_read_json(path), source=str(path))

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("source", "entropy_bound", "eos_token_ids")}
        d["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": self.entropy_bound}
        if self.eos_token_ids:
            d["eos_token_id"] = list(self.eos_token_ids)
        return d


def release_26b_a4b_text(**overrides: Any) -> dict:
    """`text_config` of the released google/diffusiongemma-26B-A4B-it (spec 1.2), with optional overrides."""
    d = dict(
        vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, num_global_key_value_heads=2, global_head_dim=512, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, hidden_activation="gelu_pytorch_tanh", sliding_window=1024,
        max_position_embeddings=262_144, final_logit_softcapping=30.0, rms_norm_eps=1e-6, attention_bias=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, model_type="diffusion_gemma_text",
        use_bidirectional_attention="vision",
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                "rope_theta": 1_000_000.0}},
    )
    d.update(overrides)
    n = d["num_hidden_layers"]
    d.setdefault("layer_types", [SLIDING if (i + 1) % 6 else FULL for i in range(n)])
    if len(d["layer_types"]) != n:
        d["layer_types"] = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        d["layer_types"][-1] = FULL
    return d
