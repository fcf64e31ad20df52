"""Checkpoint layout: round trips with transformers in both directions, shards, and clear errors on bad input."""

import json

import pytest
import torch
from helpers import make_hf_model, read_all, tiny_text_config
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma import checkpoint
from dgemma.checkpoint import CheckpointError, from_checkpoint_name, to_checkpoint_name
from dgemma.config import ConfigError, ModelConfig, release_26b_a4b_text
from dgemma.kv_cache import KVCache
from dgemma.model import DiffusionGemma

transformers = pytest.importorskip("transformers")
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # noqa: E402


def test_transformers_to_dgemma_to_transformers_keeps_every_tensor(tmp_path):
    hf = make_hf_model(canvas_length=8)
    hf.save_pretrained(tmp_path / "hf")
    ck = checkpoint.load(tmp_path / "hf")
    checkpoint.save(ck.model, tmp_path / "dg", generation=ck.generation, passthrough=ck.passthrough)
    before, after = read_all(tmp_path / "hf"), read_all(tmp_path / "dg")
    assert sorted(before) == sorted(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "dg")
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_dgemma_to_transformers_to_dgemma_identical(tmp_path):
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 16,
                                 "text_config": tiny_text_config()})
    model = DiffusionGemma(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.layer_scalar.fill_(1.0 + i)
            layer.encoder_layer_scalar.fill_(0.5 - 0.1 * i)
    checkpoint.save(model, tmp_path / "dg")
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "dg")
    assert hf.config.canvas_length == 16
    hf_sd = hf.state_dict()
    for name, t in model.state_dict().items():
        if "inv_freq" in name:
            continue
        assert torch.equal(hf_sd[to_checkpoint_name(name)], t), name
    # the encoder copy of tied weights is the same tensor in transformers
    assert torch.equal(hf_sd["model.encoder.language_model.layers.0.self_attn.q_proj.weight"],
                       model.layers[0].self_attn.q_proj.weight)
    hf.save_pretrained(tmp_path / "hf")
    again = checkpoint.load(tmp_path / "hf").model
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_sharded_save_loads_in_both(tmp_path):
    hf = make_hf_model(canvas_length=8)
    hf.save_pretrained(tmp_path / "hf")
    ck = checkpoint.load(tmp_path / "hf")
    checkpoint.save(ck.model, tmp_path / "sh", max_shard_bytes=60_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = checkpoint.load(tmp_path / "sh")
    assert again.model.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight, ck.model.embed_tokens.weight.bfloat16())
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "sh")
    assert torch.equal(back.lm_head.weight, again.model.embed_tokens.weight)


@pytest.fixture
def saved(tmp_path):
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 8,
                                 "text_config": tiny_text_config()})
    model = DiffusionGemma(cfg)
    model.init_weights()
    return checkpoint.save(model, tmp_path / "ck")


def _rewrite(path, fn):
    t = read_all(path)
    fn(t)
    (path / "model.safetensors").unlink()
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(saved):
    _rewrite(saved, lambda t: t.pop("model.decoder.layers.1.router.scale"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.decoder\.layers\.1\.router\.scale"):
        checkpoint.load(saved)


def test_unexpected_tensor_named(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.decoder.layers.9.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): model\.decoder\.layers\.9\.extra"):
        checkpoint.load(saved)


def test_wrong_shape_and_dtype(saved):
    _rewrite(saved, lambda t: t.__setitem__("model.decoder.norm.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match="norm.weight has shape"):
        checkpoint.load(saved)
    _rewrite(saved, lambda t: t.__setitem__("model.decoder.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="dtype torch.int32"):
        checkpoint.load(saved)


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load(saved)


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma",
                                                      "text_config": tiny_text_config()}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        checkpoint.load(tmp_path)


def test_config_errors_name_file_and_field(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: field 'model_type' must be 'diffusion_gemma'.*'llama'"):
        ModelConfig.from_file(p)
    bad = tiny_text_config()
    del bad["num_experts"]
    p.write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": bad}))
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['num_experts'\]"):
        ModelConfig.from_file(p)
    p.write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": tiny_text_config(top_k_experts=9)}))
    with pytest.raises(ConfigError, match="top_k_experts' must be <= num_experts"):
        ModelConfig.from_file(p)
    p.write_text(json.dumps({"model_type": "diffusion_gemma", "canvas_length": 0,
                             "text_config": tiny_text_config()}))
    with pytest.raises(ConfigError, match="canvas_length"):
        ModelConfig.from_file(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(p)


def test_release_config_maps_one_to_one_onto_the_checkpoint_layout():
    """The real 26B-A4B text config (6 layers, 4 experts, 1k vocab to stay small) on the meta device: the names
    and shapes dgemma expects equal those transformers' model holds, tied encoder copies aside."""
    text = release_26b_a4b_text(num_hidden_layers=6, num_experts=4, top_k_experts=2, vocab_size=1024)
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text,
                                 "eos_token_id": [1, 106, 50]})
    assert cfg.text.global_head_dim == 512 and cfg.text.num_global_key_value_heads == 2
    with torch.device("meta"):
        ours = DiffusionGemma(cfg)
        hf = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(
            text_config=dict(text), vision_config=None, canvas_length=256))
    mine = {to_checkpoint_name(n): tuple(t.shape) for n, t in ours.state_dict().items() if "inv_freq" not in n}
    theirs = {n: tuple(t.shape) for n, t in hf.state_dict().items()
              if not n.startswith(("model.encoder.vision_tower", "model.encoder.embed_vision", "lm_head"))
              and not (n.startswith("model.encoder.language_model.") and not n.endswith("layer_scalar"))}
    assert mine == theirs
    assert all(from_checkpoint_name(to_checkpoint_name(n)) == n for n in ours.state_dict() if "inv_freq" not in n)
    assert mine["model.decoder.layers.5.self_attn.k_proj.weight"] == (1024, 2816)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in mine
    assert mine["model.decoder.layers.0.experts.gate_up_proj"] == (4, 1408, 2816)


def test_sliding_layers_keep_only_their_window():
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": release_26b_a4b_text()}).text
    full_only = sum(2 * 262_144 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * 2
                    for i in range(30) if not cfg.is_sliding(i))
    need = KVCache.bytes_needed(cfg, num_slots=1, capacity=262_144, dtype=torch.bfloat16)
    sliding = need - full_only
    assert sliding == 25 * 2 * 1023 * 8 * 256 * 2  # 25 sliding layers x (K, V) x 1023 positions, bf16
    assert need < 1.1 * full_only


def test_device_torch_cannot_use_is_a_one_line_error(saved):
    """Loading onto a device this machine lacks fails before reading anything, in one line naming the device."""
    with pytest.raises(ValueError, match=r"^device 'cuda:99' cannot be used here \([^\n]+\)$"):
        checkpoint.load(saved, device="cuda:99")


def test_converted_and_kept_tensors_load_alike(saved):
    """A tensor kept in its dtype is the memory-mapped view; one converted is read a slab at a time (the path every
    non-CPU device takes): both give the checkpoint's numbers."""
    as_is = checkpoint.load(saved).model
    converted = checkpoint.load(saved, dtype=torch.bfloat16).model
    for (name, a), b in zip(as_is.state_dict().items(), converted.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(b, a.bfloat16()), name
