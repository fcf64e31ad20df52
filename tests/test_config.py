"""Reading config.json as transformers does: per-layer overrides that default to the base values, RoPE `factor`.

Each case saves a tiny random transformers model with an unusual configuration, loads it with dgemma and compares
the decoder logits with the oracle's, so "reads the config" means "computes what transformers computes".
"""

import json

import pytest
import torch
from helpers import make_hf_model, tiny_text_config

from dgemma import checkpoint
from dgemma.config import ConfigError, ModelConfig
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402


@torch.no_grad()
def logits_rel_err(hf, model, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    v, c = model.text.vocab_size, model.config.canvas_length
    prompt = torch.randint(0, v, (1, 11), generator=g)
    canvas = torch.randint(0, v, (1, c), generator=g)
    cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    ref = hf(decoder_input_ids=canvas, past_key_values=cache).logits[0]
    kv = KVCache(model.text, num_slots=1, capacity=11 + c)
    seg = EncodeSegment(kv, prompt, slots=[0])
    model([seg])
    seg.finish()
    got = model.logits(model([DecodeSegment(kv, canvas, torch.tensor([0]), None)])[-1])[0]
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("geometry", [dict(global_head_dim=16, num_global_key_value_heads=1),
                                      dict(global_head_dim=16, num_global_key_value_heads=2)],
                         ids=["head_dim-equal", "nothing-overridden"])
def test_per_layer_config_without_head_dim_defaults_to_base(geometry, tmp_path):
    # global_head_dim == head_dim (16): transformers writes per_layer_config entries without head_dim (or `{}`).
    hf = make_hf_model(**geometry)
    hf.save_pretrained(tmp_path)
    plc = json.loads((tmp_path / "config.json").read_text())["text_config"]["per_layer_config"]
    assert all("head_dim" not in o for o in plc.values())
    model = checkpoint.load(tmp_path).model
    assert (model.text.global_head_dim, model.text.num_global_key_value_heads) == \
        (16, geometry["num_global_key_value_heads"])
    assert logits_rel_err(hf, model) <= 1e-4


def test_rope_factor_is_ignored_for_default_rope_as_transformers_does(tmp_path):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "factor": 4.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6,
                               "factor": 2.0}}
    hf = make_hf_model(rope_parameters=rope)
    hf.save_pretrained(tmp_path)
    model = checkpoint.load(tmp_path).model
    assert model.text.rope["sliding_attention"].factor == 1.0 and model.text.rope["full_attention"].factor == 2.0
    for seed in range(3):
        assert logits_rel_err(hf, model, seed) <= 1e-4


def test_inconsistent_per_layer_config_is_refused():
    text = tiny_text_config(per_layer_config={"2": {"head_dim": 32}, "3": {"head_dim": 16}})
    with pytest.raises(ConfigError, match="same geometry"):
        ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text})
    text = tiny_text_config(per_layer_config={"0": {"sliding_window": 4}})
    with pytest.raises(ConfigError, match="per_layer_config.0"):
        ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text})
