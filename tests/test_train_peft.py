"""LoRA adapters in peft's layout: peft itself loads `final/adapter` onto the transformers model of the base
checkpoint, and gives the logits of dgemma's merged export; a LoRA run also resumes from that layout."""

import json
import shutil

import peft
import pytest
import torch
import transformers
from test_trainer import cfg, fresh, random_source

from dgemma import checkpoint
from dgemma.train import LoRAConfig, Trainer



@torch.no_grad()
def hf_logits(model, prompt, canvas):
    from transformers import DynamicCache
    model = model.get_base_model() if isinstance(model, peft.PeftModel) else model  # adapters are injected in place
    cache = DynamicCache(config=model.config.text_config)
    model.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    return model(decoder_input_ids=canvas, past_key_values=cache).logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peft_loads_the_adapter_and_matches_the_merged_export(tmp_path, seed):
    base_dir = checkpoint.save(fresh(seed=seed), tmp_path / "base")
    tr = Trainer(checkpoint.load(base_dir).model, random_source, cfg(steps=3, lr=1e-2, seed=seed),
                 tmp_path / "run", lora=LoRAConfig(rank=4, alpha=8), init_from=str(base_dir))
    tr.train()
    final = tr.export()
    adapter = final / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_dir)

    base = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
    wrapped = peft.PeftModel.from_pretrained(base, adapter).eval()
    lora_layers = [n for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    # every adapted linear, in both modes (the encoder's modules are separate objects in transformers, tied weights)
    assert len(lora_layers) == 2 * 4 * 6 + 2 * 2 + 3  # 4 layers x 6 or 7 projections (full layers: K = V), + SC
    assert any(".encoder.language_model.layers.0.self_attn.q_proj" in n for n in lora_layers)
    assert not any("vision" in n or "router" in n for n in lora_layers)
    merged = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(final).eval()
    g = torch.Generator().manual_seed(seed)
    prompt, canvas = torch.randint(3, 96, (1, 11), generator=g), torch.randint(0, 96, (1, 8), generator=g)
    ref, got = hf_logits(merged, prompt, canvas), hf_logits(wrapped, prompt, canvas)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    plain = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
    assert (hf_logits(plain, prompt, canvas) - ref).abs().max() > 1e-2  # the adapter does change the model


def test_lora_checkpoints_are_peft_adapters_and_resume_exactly(tmp_path):
    base_dir = checkpoint.save(fresh(), tmp_path / "base")
    c = cfg(steps=4, save_every=2, lr=1e-2)
    lora = LoRAConfig(rank=4)
    straight = Trainer(checkpoint.load(base_dir).model, random_source, c, tmp_path / "a", lora=lora)
    straight.train()
    ck = tmp_path / "a/checkpoints/step-00000002"
    assert (ck / "adapter/adapter_config.json").is_file() and (ck / "adapter/adapter_model.safetensors").is_file()
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy)
    shutil.rmtree(copy / "checkpoints/step-00000004")
    (copy / "checkpoints/LATEST").write_text("step-00000002")
    resumed = Trainer(checkpoint.load(base_dir).model, random_source, c, copy, lora=lora)
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
